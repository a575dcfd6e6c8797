import json

import pytest

from layerprune import DataConfig, HealConfig, PruneConfig, prune
from layerprune.errors import LayerpruneError
from layerprune.data import StreamPosition
from layerprune.models import load_model
from layerprune.depth import Depth
from layerprune.healing.guard import RETRY_LR_FACTOR
from layerprune.inputs import build_inputs
from layerprune.run import PruneRun

from common import check_output_folder, save_tiny

DATA = dict(seq_len=32, calib_blocks=4, patch_blocks=8, eval_blocks=4, batch_size=2)
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
    assert history.final_layers == 4 and len(history.iterations) == 2
    assert len(set(history.removed_original)) == 2
    saved = check_output_folder(out, depth=4, removed=2)
    assert saved["config"]["metric"] == metric
    assert history.depth == "--target-layers 4" and "Depth: --target-layers 4." in (out / "README.md").read_text()
    assert set(saved["iterations"][0]["scores"]) == {str(i) for i in range(6)}


def test_removed_layer_is_the_lowest_scored(tiny_dir, text_file, tmp_path):
    history = prune(config(tiny_dir, text_file, tmp_path / "o", metric="bi", remove=1), progress=False)
    scores = history.iterations[0].scores
    assert history.removed_original == [int(min(scores, key=scores.get))]


def test_protected_layers_are_never_removed(tiny_dir, text_file, tmp_path):
    history = prune(config(tiny_dir, text_file, tmp_path / "o", metric="bi", remove=3, protect_first=2,
                           protect_last=1), progress=False)
    assert set(history.removed_original) == {2, 3, 4}


@pytest.mark.parametrize("mode,metric", [("one-shot", "bi"), ("block", "angular_last")])
def test_one_shot_and_block_modes(tiny_dir, text_file, tmp_path, mode, metric):
    history = prune(config(tiny_dir, text_file, tmp_path / "o", metric=metric, mode=mode, remove=2), progress=False)
    assert len(history.iterations) == 1 and history.final_layers == 4
    removed = history.removed_original
    if mode == "block":
        assert removed[1] == removed[0] + 1 and history.iterations[0].block_start == removed[0]


def test_healing_runs_in_the_loop_and_logs(tiny_dir, text_file, tmp_path):
    out = tmp_path / "o"
    history = prune(config(tiny_dir, text_file, out, metric="bi", remove=2, heal=QUICK_HEAL, eval_before_heal=True),
                    progress=False)
    heal = history.iterations[0].heal
    assert heal.steps == 2 and "kl" in history.iterations[0].held_out_after and "kl" in heal.held_out_before
    assert f"{heal.held_out_before['kl']:.4f} -> " in (out / "report.md").read_text()
    saved = json.loads((out / "history.json").read_text())["iterations"][0]["heal"]
    assert saved["held_out_after"] == history.iterations[0].eval.headline()
    rows = (out / "logs" / "heal.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,attempt,step") and len(rows) >= 1 + 4
    assert not (out / "cache").exists()


def test_one_meaning_of_quality_retained(tiny_dir, text_file, tmp_path):
    """The headline averages the same tasks as every iteration; the suite figure has its own name."""
    history = prune(config(tiny_dir, text_file, tmp_path / "o", metric="bi", remove=1,
                           final_tasks=("continuation",)), progress=False)
    last = history.iterations[-1].eval
    assert history.final_eval.averaged_over == last.averaged_over == ["perplexity", "token_accuracy", "kl"]
    assert history.final_eval.quality_retained == pytest.approx(last.quality_retained)
    assert history.final_suite.averaged_over == ["perplexity", "token_accuracy", "kl", "continuation"]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["quality_retained"] == history.final_eval.quality_retained
    assert report["suite_quality_retained"] == history.final_suite.quality_retained


def test_same_seed_same_result(tiny_dir, text_file, tmp_path):
    a = prune(config(tiny_dir, text_file, tmp_path / "a", remove=2, heal=QUICK_HEAL), progress=False)
    b = prune(config(tiny_dir, text_file, tmp_path / "b", remove=2, heal=QUICK_HEAL), progress=False)
    assert a.removed_original == b.removed_original
    assert a.final_suite == b.final_suite


def test_a_run_without_a_folder_is_the_run_compare_makes(tiny_dir, text_file, tmp_path):
    """The same removals from the same inputs, without an output folder: nothing written."""
    cfg = config(tiny_dir, text_file, tmp_path / "never", metric="bi", remove=2)
    teacher, tokenizer = load_model(cfg.model, device="cpu")
    inputs = build_inputs(cfg, teacher, tokenizer, (), teacher_scores=False)
    run = PruneRun(cfg, inputs, Depth(2, "--remove 2"), progress=False).setup()
    records = [run.step(iteration) for iteration in run.remaining()]
    assert not (tmp_path / "never").exists() and run.records == records
    history = prune(cfg, progress=False)
    assert [r.removed_original for r in records] == [r.removed_original for r in history.iterations]
    assert records[-1].eval == history.iterations[-1].eval


def test_existing_run_is_not_overwritten(tiny_dir, text_file, tmp_path):
    out = tmp_path / "o"
    prune(config(tiny_dir, text_file, out, metric="bi", remove=1), progress=False)
    with pytest.raises(LayerpruneError, match="already holds a finished run"):
        prune(config(tiny_dir, text_file, out, metric="bi", remove=1), progress=False)


def test_nan_in_the_model_stops_with_the_iteration_named(text_file, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_dir = save_tiny(tmp_path / "broken")   # its own: the session's model is only read
    weights = load_file(str(tiny_dir / "model.safetensors"))
    weights["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(tiny_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LayerpruneError, match="iteration 1: .*not finite"):
        prune(config(tiny_dir, text_file, tmp_path / "o", remove=1), progress=False)
    assert not (tmp_path / "o" / "history.json").exists()


@pytest.mark.parametrize("metric,mode", [("nll", "iterative"), ("angular_last", "block")])
def test_a_patched_run_records_its_patch_and_saves_a_plain_model(tiny_dir, text_file, tmp_path, metric, mode):
    out = tmp_path / "o"
    history = prune(config(tiny_dir, text_file, out, metric=metric, mode=mode, remove=2, patch="lstsq"),
                    progress=False)
    check_output_folder(out, depth=4, removed=2)
    for record in history.iterations:
        assert record.patch["kind"] == "lstsq"
        for folded in record.patch["folded"]:
            assert folded["tokens"] == 8 * 32 and folded["deviation"] > 0
    plain = prune(config(tiny_dir, text_file, tmp_path / "plain", metric=metric, mode=mode, remove=2,
                         patch="none"), progress=False)
    assert plain.iterations[0].patch is None


def test_only_the_shortlist_gets_candidate_patches_and_the_screen_runs_in_the_loop(tiny_dir, text_file, tmp_path,
                                                                                  monkeypatch):
    from layerprune import run

    fitted = []

    def spy(model, candidates, how):
        fitted.append(list(candidates))
        return candidate_patches(model, candidates, how)

    candidate_patches = run.candidate_patches
    monkeypatch.setattr(run, "candidate_patches", spy)
    history = prune(config(tiny_dir, text_file, tmp_path / "o", remove=2, patch="lstsq", shortlist=3, screen=1),
                    progress=False)
    for record, candidates in zip(history.iterations, fitted, strict=True):
        assert candidates == record.shortlist and len(candidates) == 3
        assert len([s for s in record.scores.values() if s is not None and s == s]) == 3   # by original index
        assert record.removed_current[0] in candidates


@pytest.mark.parametrize("train_data", ["stream", "reuse"])
def test_each_removal_heals_on_fresh_text_or_on_the_same(tiny_dir, text_file, tmp_path, train_data):
    heal = HealConfig(steps=2, batch_size=2, grad_accum=1, warmup_steps=1, train_data=train_data, final_steps=1)
    history = prune(config(tiny_dir, text_file, tmp_path / "o", metric="bi", remove=2, heal=heal), progress=False)
    texts = [record.heal.text for record in history.iterations] + [history.final_heal.text]
    assert [t.blocks for t in texts] == [4, 4, 2]
    if train_data == "stream":   # one stretch after the other, the final healing after both
        assert texts[0].start == StreamPosition(0, 0) and texts[1].start == texts[0].end
        assert texts[2].start == texts[1].end != texts[0].end
    else:
        assert all(t.start == StreamPosition(0, 0) for t in texts) and texts[0].end == texts[1].end
        assert "teacher targets cached" in texts[0].caches and "teacher targets cached" in texts[1].caches
        assert "holds other blocks" in texts[2].caches   # the final healing's 2 blocks are not the cache's 4
    assert "read once" in texts[0].caches or train_data == "reuse"


class TestHealingGuard:
    def test_every_healing_records_its_guard_and_the_user_lr_starts_it(self, tiny_dir, text_file, tmp_path):
        out = tmp_path / "o"
        heal = HealConfig(steps=4, batch_size=2, grad_accum=1, warmup_steps=1, lr=3e-4, checkpoint_every=2)
        history = prune(config(tiny_dir, text_file, out, metric="bi", remove=2, heal=heal), progress=False)
        first = history.iterations[0].heal.guard
        assert first.checks[0]["lr"] == 3e-4 and first.checks[0]["attempt"] == 0
        for record in history.iterations:
            guard = record.heal.guard
            assert guard.kl_after <= guard.kl_before and guard.outcome and guard.checks
        saved = json.loads((out / "history.json").read_text())
        assert saved["iterations"][1]["heal"]["guard"] == history.iterations[1].heal.guard.to_json()
        assert {"kl_before", "best", "retries", "lr_won", "checks", "outcome"} <= set(saved["iterations"][1]["heal"]
                                                                                       ["guard"])
        assert "Every healing was guarded" in (out / "README.md").read_text()
        assert "Healing guard" in (out / "report.md").read_text()
        # no held-out evaluation of the cut before healing unless asked for: the report gives the guard's KL
        assert not history.iterations[0].heal.held_out_before
        guard = history.iterations[0].heal.guard
        assert f"{guard.kl_before:.4f} -> {guard.kl_after:.4f} (validation)" in (out / "report.md").read_text()

    @pytest.mark.parametrize("final_lr", [None, 2e-4])
    def test_the_final_healing_starts_a_rung_lower_unless_told(self, tiny_dir, text_file, tmp_path, final_lr):
        """It trains every layer where a removal's healing trains the cut's neighbours."""
        heal = HealConfig(steps=2, batch_size=2, grad_accum=1, warmup_steps=1, lr=3e-4, final_steps=2,
                          final_lr=final_lr)
        history = prune(config(tiny_dir, text_file, tmp_path / "o", metric="bi", remove=1, heal=heal),
                        progress=False)
        carried = history.iterations[-1].heal.guard.next_lr()
        first = history.final_heal.guard.checks[0]
        assert first["attempt"] == 0
        assert first["lr"] == pytest.approx(final_lr or carried * RETRY_LR_FACTOR)

    def test_a_guard_that_rolls_back_every_retry_keeps_the_cut_and_warns(self, tiny_dir, text_file, tmp_path,
                                                                          caplog):
        heal = HealConfig(steps=4, batch_size=2, grad_accum=1, warmup_steps=1, lr=5.0, checkpoint_every=2,
                          guard_retries=1)
        out = tmp_path / "o"
        with caplog.at_level("WARNING", logger="layerprune"):
            history = prune(config(tiny_dir, text_file, out, metric="bi", remove=1, heal=heal, eval_before_heal=True),
                            progress=False)
        guard = history.iterations[0].heal.guard
        assert guard.outcome == "unhealed" and guard.retries == 1 and guard.kl_after == guard.kl_before
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("the unhealed cut is kept" in line and "\n" not in line for line in warned)
        assert "the unhealed cut is kept" in (out / "README.md").read_text()
        # the held-out figures before and after the healing are the cut's
        assert history.iterations[0].held_out_after["kl"] == pytest.approx(
            history.iterations[0].heal.held_out_before["kl"], rel=1e-5)

    def test_validation_is_past_all_healed_text(self, tiny_dir, text_file, tmp_path):
        """The guard's blocks follow the last healing's text in the training stream."""
        from layerprune.data import load_corpus
        from layerprune.healing.text import healing_offsets, validation_blocks

        cfg = config(tiny_dir, text_file, tmp_path / "o", metric="bi", remove=2, heal=QUICK_HEAL)
        _, tokenizer = load_model(str(tiny_dir), device="cpu")
        corpus = load_corpus(cfg.data, tokenizer)
        blocks = validation_blocks(cfg, corpus, 2, progress=False)
        end = max(healing_offsets(cfg, 2))
        expected = corpus.train.take(end + len(blocks))[0][end:]
        assert len(blocks) == cfg.data.blocks("val") and (blocks == expected).all()
        unguarded = config(tiny_dir, text_file, tmp_path / "o", metric="bi", remove=2,
                           heal=HealConfig(steps=2, batch_size=2, grad_accum=1, guard=False))
        assert validation_blocks(unguarded, corpus, 2, progress=False) is None


def test_the_final_phases_each_say_what_they_do(tiny_dir, text_file, tmp_path, caplog):
    caplog.set_level("INFO", logger="layerprune")
    prune(config(tiny_dir, text_file, tmp_path / "o", metric="bi", remove=1, heal=QUICK_HEAL, measure_speed=True,
                 final_tasks=("perplexity", "copy_generate")), progress=False)
    said = caplog.text
    for line in ("final evaluation of the original: copy_generate", "final evaluation of the pruned model: perplexity",
                 "  copy_generate: ", "final evaluation done",
                 "writing the result into", "saved 5-layer model"):
        assert line in said, line


def test_the_cosine_patch_fit_runs_in_the_loop_and_is_recorded(tiny_dir, text_file, tmp_path):
    history = prune(config(tiny_dir, text_file, tmp_path / "o", metric="nll", remove=2, patch_fit="cosine"),
                    progress=False)
    fits = [folded["fit"] for record in history.iterations for folded in record.patch["folded"]]
    assert fits and set(fits) <= {"cosine", "lstsq"}
    assert history.config["patch_fit"] == "cosine"
