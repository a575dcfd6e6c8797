import pytest

from layerprune import DataConfig, EvalConfig, ScoreConfig, evaluate, score
from layerprune.errors import LayerpruneError

DATA = dict(seq_len=32, calib_blocks=2, patch_blocks=2, eval_blocks=2, batch_size=2)


def test_score_ranks_every_layer_with_original_indices(tiny_dir, text_file):
    rows = score(ScoreConfig(model=str(tiny_dir), device="cpu", data=DataConfig(source=str(text_file), **DATA)),
                 progress=False)
    assert [r["layer"] for r in rows] == list(range(6)) and all(r["score"] >= 0 for r in rows)
    with pytest.raises(LayerpruneError, match="unknown metric"):
        score(ScoreConfig(metric="magic"))


def test_evaluate_against_the_model_itself_retains_everything(tiny_dir, text_file):
    result = evaluate(EvalConfig(model=str(tiny_dir), teacher=str(tiny_dir), device="cpu", tasks=("perplexity", "kl"),
                                 data=DataConfig(source=str(text_file), **DATA)))
    assert result["quality_retained"] == pytest.approx(1.0)
    assert result["quality_retained_tasks"] == ["perplexity", "kl"] and result["tasks"]["kl"]["kl"] == pytest.approx(0)
