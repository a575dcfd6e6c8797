import pytest
import torch
import torch.nn.functional as F

from layerprune import DataConfig, EvalConfig, ScoreConfig, evaluate, score
from layerprune.errors import LayerpruneError

DATA = dict(seq_len=32, calib_blocks=2, patch_blocks=2, eval_blocks=2, batch_size=2)


def test_score_gives_each_layer_its_block_influence_under_its_original_index(tiny_dir, text_file, tmp_path):
    """On a model already cut (layers 1 and 3 gone), every row names the layer's original index and
    holds its Block Influence: 1 - cos between the states entering and leaving it, computed here
    from HF's own hidden states on the same calibration blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerprune.data import load_corpus
    from layerprune.surgery import remove_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    remove_layers(model, [1, 3])
    model.save_pretrained(tmp_path / "cut")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "cut")
    data = DataConfig(source=str(text_file), **DATA)
    rows = score(ScoreConfig(model=str(tmp_path / "cut"), device="cpu", data=data), progress=False)
    assert [r["layer"] for r in rows] == [0, 2, 4, 5] and [r["current"] for r in rows] == [0, 1, 2, 3]
    blocks = load_corpus(data, AutoTokenizer.from_pretrained(tiny_dir)).blocks["calib"]
    with torch.no_grad():
        states = [model(input_ids=blocks[i:i + 2], output_hidden_states=True).hidden_states
                  for i in range(0, len(blocks), 2)]
    for current in range(3):   # the last layer's output passes the final norm in HF's list: not compared
        expected = sum(float((1 - F.cosine_similarity(h[current], h[current + 1], dim=-1)).mean()) for h in states)
        assert rows[current]["score"] == pytest.approx(expected / len(states), rel=1e-4)
    with pytest.raises(LayerpruneError, match="unknown metric"):
        score(ScoreConfig(metric="magic"))


def test_evaluate_against_the_model_itself_retains_everything(tiny_dir, text_file):
    result = evaluate(EvalConfig(model=str(tiny_dir), teacher=str(tiny_dir), device="cpu", tasks=("perplexity", "kl"),
                                 data=DataConfig(source=str(text_file), **DATA)))
    assert result["quality_retained"] == pytest.approx(1.0)
    assert result["quality_retained_tasks"] == ["perplexity", "kl"] and result["tasks"]["kl"]["kl"] == pytest.approx(0)


def test_evaluate_on_the_calibration_documents_reads_another_text(tiny_dir, text_file):
    """--split calib: the training-side calibration text (for choosing a recipe), not the held-out text."""
    from layerprune.data import load_corpus
    from layerprune.models import load_model

    data = DataConfig(source=str(text_file), **DATA)
    held, calib = (evaluate(EvalConfig(model=str(tiny_dir), device="cpu", tasks=("perplexity",), data=data,
                                       split=split)) for split in ("eval", "calib"))
    assert (held["split"], calib["split"]) == ("eval", "calib")
    _, tokenizer = load_model(str(tiny_dir), "float32", "cpu")
    corpus = load_corpus(data, tokenizer)
    assert not torch.equal(corpus.blocks["eval"], corpus.blocks["calib"])
    assert held["tasks"]["perplexity"]["perplexity"] != calib["tasks"]["perplexity"]["perplexity"]
    with pytest.raises(LayerpruneError, match="--split"):
        evaluate(EvalConfig(model=str(tiny_dir), device="cpu", tasks=("perplexity",), data=data, split="train"))
