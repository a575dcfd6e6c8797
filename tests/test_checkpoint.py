import json

import pytest
import torch

from layerprune.checkpoint import (Evaluation, History, IterationRecord, PendingIteration, continues, find_checkpoint,
                                   restore_student, resume_point, save_checkpoint, save_heal_checkpoint)
from layerprune.errors import LayerpruneError
from layerprune.healing.job import HealLog
from layerprune.importance import Selection
from layerprune.surgery import remove_layers

from common import tiny_model

CONFIG = {"model": "m", "measure_speed": True, "heal": {"steps": 3, "checkpoint_every": 2}}


def record(iteration=1, heal=True):
    log = HealLog(3, [1, 2], [(2, 3)], [{"iteration": iteration, "step": 1, "loss": 0.5}],
                  held_out_before={"kl": 0.3}) if heal else None
    return IterationRecord(iteration, {"0": 0.1, "1": None, "2": 0.3}, [1], [1], 5,
                           Evaluation({"kl": {"score": 0.9, "kl": 0.1}}, 0.9, ["kl"]), log,
                           {"score_s": 1.0, "heal_s": 2.0, "eval_s": 0.5}, shortlist=[0, 1])


class TestRecords:
    def test_iteration_record_json_round_trip(self):
        for heal in (True, False):
            rec = record(heal=heal)
            again = IterationRecord.from_json(json.loads(json.dumps(rec.to_json())))
            assert again == rec
        assert "block_start" not in record().to_json() and record(heal=False).to_json()["heal"] is None
        assert record().to_json()["heal"]["held_out_after"] == {"kl": 0.1}   # the iteration's evaluation

    def test_pending_iteration_round_trip_keeps_nan_scores(self):
        pending = PendingIteration(2, Selection([float("nan"), 0.5], [1], shortlist=None, block_start=None), 1.5,
                                   {"kl": 0.2}, step=4)
        again = PendingIteration.from_json(json.loads(json.dumps(pending.to_json())))
        assert again.selection.drop == [1] and again.selection.scores[1] == 0.5 and again.step == 4
        assert again.selection.scores[0] != again.selection.scores[0]

    def test_history_round_trip(self):
        ev = Evaluation({"kl": {"score": 0.9}}, 0.9, ["kl"])
        history = History(CONFIG, "m", 6, 5, [1], [0, 2, 3, 4, 5], {"kl": {"score": 1.0}}, [record()], None, ev, ev,
                          12.0)
        assert History.from_json(json.loads(json.dumps(history.to_json()))) == history


class TestResumeDecision:
    def test_fresh_start_and_resume_without_a_run(self, tmp_path):
        assert resume_point(CONFIG, tmp_path / "o", resume=False).folder is None
        with pytest.raises(LayerpruneError, match="no unfinished run"):
            resume_point(CONFIG, tmp_path / "o", resume=True)

    def test_resumes_the_healing_in_flight_and_refuses_another_config(self, tmp_path):
        model = tiny_model("llama")
        save_checkpoint(tmp_path, CONFIG, [record()], model)
        pending = PendingIteration(2, Selection([0.1] * 5, [3]), 1.0, {"kl": 0.2})
        save_heal_checkpoint(tmp_path, CONFIG, None, pending, {"step": 2, "rows": []})
        point = resume_point(CONFIG, tmp_path, resume=False)
        assert point.records == [record()] and point.pending.iteration == 2 and point.pending.step == 2
        assert point.heal_state == {"step": 2, "rows": []}
        unimportant = {**CONFIG, "measure_speed": False, "heal": {"steps": 3, "checkpoint_every": 5}}
        assert resume_point(unimportant, tmp_path, resume=True).pending is not None
        with pytest.raises(LayerpruneError, match="different configuration"):
            resume_point({**CONFIG, "heal": {"steps": 4, "checkpoint_every": 2}}, tmp_path, False)

    def test_continues_only_an_unfinished_run_of_the_same_results(self, tmp_path):
        assert not continues(CONFIG, tmp_path)   # nothing there
        save_heal_checkpoint(tmp_path, CONFIG, None, PendingIteration(1, Selection([0.1], [0])), {"step": 1})
        assert continues({**CONFIG, "measure_speed": False}, tmp_path)
        assert not continues({**CONFIG, "heal": {"steps": 4, "checkpoint_every": 2}}, tmp_path)
        (tmp_path / "history.json").write_text("{}")
        assert not continues(CONFIG, tmp_path)   # finished: nothing to continue

    def test_a_recorded_iteration_drops_its_healing_checkpoint(self, tmp_path):
        model = tiny_model("llama")
        save_heal_checkpoint(tmp_path, CONFIG, None, PendingIteration(1, Selection([0.1], [0])), {"step": 1})
        save_checkpoint(tmp_path, CONFIG, [record()], model)
        assert find_checkpoint(tmp_path, "heal-checkpoint") is None
        assert resume_point(CONFIG, tmp_path, False).pending is None

    def test_a_finished_run_is_kept_and_out_spelled_otherwise_still_resumes(self, tmp_path):
        model = tiny_model("llama")
        save_checkpoint(tmp_path, {**CONFIG, "out": "runs/x"}, [record()], model)
        assert resume_point({**CONFIG, "out": str(tmp_path) + "/"}, tmp_path, True).records == [record()]
        (tmp_path / "history.json").write_text("{}")
        with pytest.raises(LayerpruneError, match="already holds a finished run"):
            resume_point(CONFIG, tmp_path, False)


class TestVerifiedCheckpoints:
    """Every checkpoint carries the size and sha256 of its files; a resume checks them first."""

    @pytest.fixture
    def saved(self, tmp_path):
        model = tiny_model("llama")
        remove_layers(model, [1])
        save_checkpoint(tmp_path, CONFIG, [record()], model)
        return tmp_path / "checkpoint"

    def test_bytes_changed_inside_the_weights_are_detected(self, saved):
        weights = saved / "student.safetensors"
        data = bytearray(weights.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 4096] = bytes(min(4096, len(data) - middle))
        weights.write_bytes(bytes(data))
        with pytest.raises(LayerpruneError, match="student.safetensors has changed since it was written"):
            resume_point(CONFIG, saved.parent, True)

    def test_a_truncated_or_missing_file_is_named(self, saved):
        weights = saved / "student.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        with pytest.raises(LayerpruneError, match="student.safetensors has changed"):
            resume_point(CONFIG, saved.parent, True)
        weights.unlink()
        with pytest.raises(LayerpruneError, match="student.safetensors is missing"):
            resume_point(CONFIG, saved.parent, True)

    @pytest.mark.parametrize("state, why", [({}, "no config or entries"),
                                            ({"config": CONFIG, "entries": [{"iteration": 1}]}, "malformed")])
    def test_a_structurally_wrong_state_is_one_error(self, saved, state, why):
        rewrite(saved, "state.json", json.dumps(state))
        with pytest.raises(LayerpruneError, match=why):
            resume_point(CONFIG, saved.parent, True)

    def test_a_removal_the_model_does_not_have_is_refused(self, saved):
        point = resume_point(CONFIG, saved.parent, True)
        bad = IterationRecord.from_json({**record().to_json(), "removed_current": [42]})
        with pytest.raises(LayerpruneError, match=r"removes layer\(s\) \[42\]"):
            restore_student(tiny_model("llama"), point.folder, [bad])

    def test_non_finite_weights_name_the_checkpoint_as_broken(self, saved):
        from safetensors.torch import load_file, save_file

        weights = load_file(saved / "student.safetensors")
        name = next(iter(weights))
        weights[name][0] = float("nan")
        save_file(weights, saved / "student.safetensors")
        rewrite(saved, None, None)
        point = resume_point(CONFIG, saved.parent, True)
        with pytest.raises(LayerpruneError, match="the checkpoint itself is broken"):
            restore_student(tiny_model("llama"), point.folder, point.records)


def rewrite(folder, name, text):
    """Write a file into a checkpoint and refresh its manifest (a well-formed but wrong checkpoint)."""
    from layerprune.io import MANIFEST, file_entry

    if name is not None:
        (folder / name).write_text(text)
    files = {p.name: file_entry(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}))


def test_checkpoint_round_trip_with_tied_embeddings(tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    student = tiny_model("llama")
    student.config.tie_word_embeddings = True
    student.tie_weights()
    remove_layers(student, [2])
    with torch.no_grad():
        student.model.embed_tokens.weight.add_(1.0)
    rec = IterationRecord(1, {}, [2], [2], 5, Evaluation({}, 1.0, []), None, {})
    save_checkpoint(tmp_path, {"x": 1}, [rec], student)
    restore_student(model, find_checkpoint(tmp_path), [rec])
    for key, value in student.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _changed(field):
    """A valid value of a HealConfig field other than its default."""
    default = field.default
    named = {"method": "none", "train_data": "reuse", "trainable": "all", "mse_scale": "raw", "mixed_precision": "bf16",
             "tokens": 4096, "steps": 5, "mse_layers": (1,), "cache_memory": 1.0, "cache_disk": 1.0}
    if field.name in named:
        return named[field.name]
    return (not default) if isinstance(default, bool) else default * 2 if default else 1


def test_resume_and_the_card_read_one_declaration_of_what_changes_a_result():
    """Each healing option changed alone: resume accepts it exactly when the card still calls the
    run the default recipe; the cache options change the KL term (top-k targets), so they count."""
    import dataclasses

    from layerprune.checkpoint import results_part
    from layerprune.config import HealConfig, PruneConfig
    from layerprune.options import to_dict
    from layerprune.report import is_default_recipe

    base = PruneConfig(out="o", remove=1)
    free = []
    for field in dataclasses.fields(HealConfig):
        changed = dataclasses.replace(base, heal=dataclasses.replace(base.heal, **{field.name: _changed(field)}))
        assert changed.heal != base.heal, field.name
        resumable = results_part(to_dict(changed)) == results_part(to_dict(base))
        assert resumable == is_default_recipe(changed), field.name
        free += [field.name] if resumable else []
    assert sorted(free) == ["checkpoint_every", "gradient_checkpointing", "log_every"]
    for cache in ({"teacher_cache": False}, {"cache_disk": 1.0}, {"cache_memory": 1.0}):
        assert not is_default_recipe(dataclasses.replace(base, heal=dataclasses.replace(base.heal, **cache)))


def test_a_history_written_before_the_healing_package_still_reads_reports_and_writes_back(tmp_path):
    """history.json of 2026-12-06 (guard and text were dicts then): read into the typed records,
    written back the same (plus the speed the run now records), and reported."""
    from pathlib import Path

    from layerprune.data import StreamPosition
    from layerprune.healing import GuardLog
    from layerprune.report import write_report

    data = json.loads((Path(__file__).parent / "data" / "history-2026-12-06.json").read_text())
    history = History.from_json(data)
    heal = history.iterations[1].heal
    assert isinstance(heal.guard, GuardLog) and heal.guard.outcome == "unhealed"
    assert heal.text.start == StreamPosition(*data["iterations"][1]["heal"]["text"]["start"]) and heal.text.blocks == 8
    written = history.to_json()
    assert written.pop("speed") == {} and written == data
    (tmp_path / "config.yaml").write_text("model: tiny\n")
    report = write_report(tmp_path, history)
    assert report["removed_original"] == data["removed_original"]
    assert "the unhealed cut is kept" in (tmp_path / "README.md").read_text()
