import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune import DataConfig, HealConfig, PruneConfig, prune
from layerprune.errors import LayerpruneError

DATA = dict(seq_len=32, calib_blocks=4, train_blocks=8, eval_blocks=4, batch_size=2)
NO_HEAL = HealConfig(method="none")
QUICK_HEAL = HealConfig(steps=2, batch_size=2, grad_accum=1, warmup_steps=1)


def config(tiny_dir, text_file, out, **kw):
    base = dict(out=str(out), model=str(tiny_dir), data=DataConfig(source=str(text_file), **DATA), heal=NO_HEAL,
                device="cpu", final_tasks=("perplexity",), measure_speed=False)
    return PruneConfig(**{**base, **kw})


@pytest.mark.parametrize("metric", ["quality", "bi", "nll", "angular_last"])
def test_iterative_loop_reaches_the_target_and_saves(tiny_dir, text_file, tmp_path, metric):
    out = tmp_path / "out"
    history = prune(config(tiny_dir, text_file, out, metric=metric, target_layers=4), progress=False)
    assert history["final_layers"] == 4 and len(history["iterations"]) == 2
    assert len(set(history["removed_original"])) == 2
    saved = json.loads((out / "history.json").read_text())
    assert saved["status"] == "complete" and saved["config"]["metric"] == metric
    first = saved["iterations"][0]
    assert set(first["scores"]) == {str(i) for i in range(6)}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    assert model.config.layerprune_original_layers == history["kept_original"]
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_removed_layer_is_the_lowest_scored(tiny_dir, text_file, tmp_path):
    history = prune(config(tiny_dir, text_file, tmp_path / "o", metric="bi", remove=1), progress=False)
    scores = history["iterations"][0]["scores"]
    assert history["removed_original"] == [int(min(scores, key=scores.get))]


def test_protected_layers_are_never_removed(tiny_dir, text_file, tmp_path):
    history = prune(config(tiny_dir, text_file, tmp_path / "o", metric="bi", remove=3, protect_first=2,
                           protect_last=1), progress=False)
    assert set(history["removed_original"]) == {2, 3, 4}


@pytest.mark.parametrize("mode,metric", [("one-shot", "bi"), ("block", "angular_last")])
def test_one_shot_and_block_modes(tiny_dir, text_file, tmp_path, mode, metric):
    history = prune(config(tiny_dir, text_file, tmp_path / "o", metric=metric, mode=mode, remove=2), progress=False)
    assert len(history["iterations"]) == 1 and history["final_layers"] == 4
    removed = history["removed_original"]
    if mode == "block":
        assert removed[1] == removed[0] + 1


def test_healing_runs_in_the_loop_and_logs(tiny_dir, text_file, tmp_path):
    out = tmp_path / "o"
    history = prune(config(tiny_dir, text_file, out, metric="bi", remove=2, heal=QUICK_HEAL), progress=False)
    heal = history["iterations"][0]["heal"]
    assert heal["steps"] == 2 and "kl" in heal["held_out_after"]
    rows = (out / "logs" / "heal.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,step") and len(rows) == 1 + 4


def test_same_seed_same_result(tiny_dir, text_file, tmp_path):
    a = prune(config(tiny_dir, text_file, tmp_path / "a", remove=2, heal=QUICK_HEAL), progress=False)
    b = prune(config(tiny_dir, text_file, tmp_path / "b", remove=2, heal=QUICK_HEAL), progress=False)
    assert a["removed_original"] == b["removed_original"]
    assert a["final_eval"] == b["final_eval"]


def test_existing_run_is_not_overwritten(tiny_dir, text_file, tmp_path):
    out = tmp_path / "o"
    prune(config(tiny_dir, text_file, out, metric="bi", remove=1), progress=False)
    with pytest.raises(LayerpruneError, match="already holds a finished run"):
        prune(config(tiny_dir, text_file, out, metric="bi", remove=1), progress=False)


def test_reports_plots_and_model_card(tiny_dir, text_file, tmp_path):
    out = tmp_path / "o"
    history = prune(config(tiny_dir, text_file, out, remove=2, heal=QUICK_HEAL, measure_speed=True,
                           final_tasks=PruneConfig.final_tasks), progress=False)
    for name in ("report.md", "report.json", "README.md", "importance_heatmap.png", "quality_retained.png",
                 "heal_loss.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["removed_original"] == history["removed_original"]
    assert [n for n, _ in report["quality_curve"]] == [0, 1, 2]
    assert set(report["speed"]) == {"original", "pruned"}
    assert report["speed"]["pruned"]["prefill_tokens_per_s"] > 0
    assert set(report["final_eval"]) >= {"perplexity", "kl", "continuation", "copy", "copy_generate"}
    card = (out / "README.md").read_text()
    assert "base_model:" in card and '"metric": "quality"' in card
    assert (out / "importance_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_nan_in_the_model_stops_with_the_iteration_named(tiny_dir, text_file, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tiny_dir / "model.safetensors"))
    weights["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(tiny_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LayerpruneError, match="iteration 1: .*not finite"):
        prune(config(tiny_dir, text_file, tmp_path / "o", remove=1), progress=False)
    assert not (tmp_path / "o" / "history.json").exists()
