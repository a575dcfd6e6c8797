import copy
import dataclasses

import pytest
import torch

from layerprune.healing import losses, step as heal_loss
from layerprune.config import HealConfig
from layerprune.errors import LayerpruneError, NonFiniteError
from layerprune.healing.loop import heal
from layerprune.healing.job import HealLog, cut_positions, mse_pairs, plan, trainable_layers
from layerprune.surgery import find_layers, remove_layers
from layerprune.healing.targets import TeacherTargets
from layerprune.tasks import TaskData, build_tasks, evaluate_tasks

from common import tiny_model


def blocks(seed=0, n=16, length=32):
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def quick(**kw):
    base = dict(steps=4, batch_size=2, grad_accum=1, warmup_steps=1, lr=1e-3, log_every=1)
    return HealConfig(**{**base, **kw})


def job_for(student, config, dropped, steps=None, **kw):
    job = plan(student, config, steps if steps is not None else config.steps, iteration=1, seed=0, dropped=dropped)
    return dataclasses.replace(job, **kw)


def pruned(teacher, drop):
    student = copy.deepcopy(teacher)
    remove_layers(student, drop)
    return student


class TestPlan:
    def test_cut_positions_and_neighbours(self):
        assert cut_positions([3]) == [3]
        assert cut_positions([5, 2]) == [2, 4]
        assert trainable_layers(10, [4], HealConfig(radius=1)) == [3, 4]
        assert trainable_layers(10, [0], HealConfig(radius=2)) == [0, 1]
        assert trainable_layers(10, [4], HealConfig(trainable="all")) == list(range(10))

    def test_mse_pairs_map_to_the_original_layer_once(self):
        student = pruned(tiny_model("llama"), [3])
        job = plan(student, HealConfig(), 5, iteration=2, seed=7, dropped=[3])
        assert job.cuts == [3] and job.pairs == [(3, 4)] and job.layers == [1, 2, 3, 4]
        assert mse_pairs(student, [3], HealConfig(mse_layers=(0, 5))) == [(0, 0), (4, 5)]
        assert mse_pairs(student, [3], HealConfig(w_mse=0)) == []

    def test_heal_log_json_round_trip(self):
        log = HealLog(3, [1, 2], [(2, 3)], [{"loss": 1.0}, {"loss": 0.5}], resumed_at_step=2,
                      held_out_before={"kl": 0.2})
        data = log.to_json()
        assert data["first_loss"] == 1.0 and data["last_loss"] == 0.5 and data["mse_pairs"] == [[2, 3]]
        assert HealLog.from_json(data) == log
        assert "resumed_at_step" not in HealLog(1, [], []).to_json()


class TestHeal:
    """heal(), the training loop."""

    def test_student_equal_to_teacher_has_zero_loss(self):
        teacher = tiny_model("llama")
        student = copy.deepcopy(teacher)
        log = heal(student, teacher, blocks(), job_for(student, quick(steps=1, lr=1e-12), []), progress=False)
        assert log.rows[0]["loss"] == pytest.approx(0.0, abs=1e-6)

    def test_only_the_neighbours_change_bit_for_bit(self):
        teacher = tiny_model("llama")
        student = pruned(teacher, [3])
        before = {k: v.clone() for k, v in student.state_dict().items()}
        log = heal(student, teacher, blocks(), job_for(student, quick(radius=1), [3]), progress=False)
        assert log.trained_layers_current == [2, 3]
        for key, value in student.state_dict().items():
            if not key.startswith(("model.layers.2.", "model.layers.3.")):
                assert torch.equal(value, before[key]), key
        assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items()
                   if k.startswith("model.layers.2."))
        assert not any(p.requires_grad for p in student.parameters())

    def test_one_process_heals_in_one_precision_then_another(self):
        """A notebook or a sweep runs healings of different precisions in one process."""
        teacher = tiny_model("llama")
        for precision in ("no", "bf16", "no"):
            student = pruned(teacher, [3])
            log = heal(student, teacher, blocks(), job_for(student, quick(steps=1, mixed_precision=precision), [3]),
                       progress=False)
            assert torch.isfinite(torch.tensor(log.rows[0]["loss"]))

    def test_healing_lowers_held_out_kl(self):
        teacher = tiny_model("llama")
        with torch.no_grad():
            teacher.get_output_embeddings().weight.mul_(20)
        student = pruned(teacher, [2])
        tasks = build_tasks(["kl"], TaskData(None, blocks(seed=1), [], 4))
        before = evaluate_tasks(student, tasks, teacher)["kl"]["kl"]
        job = job_for(student, quick(steps=30, warmup_steps=2, radius=1), [2])
        heal(student, teacher, blocks(), job, progress=False)
        assert evaluate_tasks(student, tasks, teacher)["kl"]["kl"] < 0.7 * before

    def test_last_trains_the_lm_head_and_the_last_three_layers_only(self):
        teacher = tiny_model("llama")
        student = pruned(teacher, [1])
        before = {k: v.clone() for k, v in student.state_dict().items()}
        job = job_for(student, quick(trainable="last"), [1], steps=2)
        assert job.layers == [2, 3, 4]
        heal(student, teacher, blocks(), job, progress=False)
        changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
        assert changed and all(k.startswith(("model.layers.2.", "model.layers.3.", "model.layers.4.", "lm_head"))
                               for k in changed), changed
        assert any(k.startswith("lm_head") for k in changed)

    def test_lora_merges_back_into_plain_layers(self):
        teacher = tiny_model("llama")
        student = pruned(teacher, [1])
        before = {k: v.clone() for k, v in student.state_dict().items()}
        job = job_for(student, quick(trainable="lora", lora_r=4), [1], steps=3)
        heal(student, teacher, blocks(), job, progress=False)
        state = student.state_dict()
        assert set(state) == set(before)  # no adapter weights left behind
        assert type(find_layers(student).layers[0].self_attn.q_proj) is torch.nn.Linear
        assert any(not torch.equal(state[k], before[k]) for k in state if ".layers." in k)
        assert torch.equal(state["model.embed_tokens.weight"], before["model.embed_tokens.weight"])

    def test_different_vocabularies_are_refused(self):
        teacher = tiny_model("llama")
        student = tiny_model("llama")
        student.resize_token_embeddings(120)
        with pytest.raises(LayerpruneError, match="vocabularies differ"):
            heal(student, teacher, blocks(), job_for(student, quick(), [], steps=1), progress=False)

    def test_non_finite_loss_stops_and_keeps_weights(self):
        teacher = tiny_model("llama")
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            find_layers(student).layers[5].mlp.down_proj.weight[0, 0] = float("nan")
        before = {k: v.clone() for k, v in student.state_dict().items()}
        job = dataclasses.replace(job_for(student, quick(), [], steps=3), cuts=[5], layers=[4, 5])
        with pytest.raises(NonFiniteError, match="step 1"):
            heal(student, teacher, blocks(), job, progress=False)
        for key, value in student.state_dict().items():
            assert torch.equal(value, before[key]) or torch.isnan(value).any()

    @pytest.mark.parametrize("trainable", ["neighbours", "all"])
    def test_every_cache_combination_gives_the_straightforward_loss(self, tmp_path, trainable):
        """Teacher targets cached or online, frozen-prefix states cached or online: the same losses."""
        teacher = tiny_model("llama")
        data = blocks()
        runs = {}
        for targets_cached, prefix_cached in ((False, False), (True, False), (False, True), (True, True)):
            student = pruned(teacher, [3])
            targets = TeacherTargets.open(tmp_path / f"t{prefix_cached}", teacher, data, topk=96, progress=False) \
                if targets_cached else None
            job = job_for(student, quick(trainable=trainable, grad_accum=2, steps=10), [3], prefix_cache=prefix_cached)
            runs[targets_cached, prefix_cached] = heal(student, teacher, data, job, targets, progress=False)
        reference = runs[False, False]
        assert len(reference.rows) == 10   # 40 micro-batches of 2 over 16 blocks: the text is passed 2.5 times
        for name, run in runs.items():
            for a, b in zip(reference.rows, run.rows):
                for key in ("loss", "kl", "mse", "final_mse"):
                    assert a[key] == pytest.approx(b[key], abs=1e-4), (name, key)

    @pytest.mark.parametrize("local", [0, 4])
    def test_the_student_started_from_the_teachers_state_heals_as_the_whole_pass(self, monkeypatch, local):
        """Below the lowest trained layer the student is still the teacher: starting it from the
        teacher's state there gives the losses and weights of running its own prefix."""
        teacher = tiny_model("llama")
        data = blocks()
        config = quick(grad_accum=2, steps=6, local_steps=local)
        assert heal_loss.shares_prefix(pruned(teacher, [3]), teacher, 1)

        def run():
            student = pruned(teacher, [3])
            return student, heal(student, teacher, data, job_for(student, config, [3]), progress=False)

        shared, shared_log = run()
        monkeypatch.setattr(heal_loss, "shares_prefix", lambda *args: False)
        own, own_log = run()
        for a, b in zip(own_log.rows, shared_log.rows):
            for key in ("loss", "kl", "mse", "final_mse"):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
        for key, value in own.state_dict().items():
            torch.testing.assert_close(shared.state_dict()[key], value, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("trainable", ["neighbours", "last"])
    def test_the_kl_from_the_heads_inputs_heals_as_the_whole_logits(self, monkeypatch, trainable):
        """The fused KL (losses.head_kl_loss, no [B, T, V] logits) gives the losses and weights of
        the KL on whole logits, the LM head trained too (`last`)."""
        teacher = tiny_model("llama")
        data = blocks()
        config = quick(grad_accum=2, steps=4, trainable=trainable)
        assert heal_loss.fused_head(pruned(teacher, [3]), teacher)
        calls = []
        monkeypatch.setattr(heal_loss, "head_kl_loss", lambda *a: calls.append(1) or losses.head_kl_loss(*a))

        def run():
            student = pruned(teacher, [3])
            return student, heal(student, teacher, data, job_for(student, config, [3]), progress=False)

        fused, fused_log = run()
        assert calls
        monkeypatch.setattr(heal_loss, "fused_head", lambda *args: False)
        whole, whole_log = run()
        for a, b in zip(whole_log.rows, fused_log.rows):
            for key in ("loss", "kl", "mse", "final_mse"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key   # float32 rounding of a small KL
        for key, value in whole.state_dict().items():
            torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-4, atol=1e-6)

    def test_a_head_that_is_not_a_linear_map_keeps_the_whole_logits(self):
        teacher = tiny_model("llama")
        capped = pruned(teacher, [3])
        head = capped.get_output_embeddings()
        head.register_forward_hook(lambda module, args, out: out * 0.5)   # a logit scale, as Cohere's
        assert not heal_loss.fused_head(capped, teacher)
        assert not heal_loss.fused_head(teacher, capped)

    def test_a_student_whose_bottom_differs_from_the_teacher_runs_its_own_prefix(self):
        teacher = tiny_model("llama")
        assert not heal_loss.shares_prefix(pruned(teacher, [0]), teacher, 1)   # a cut below
        assert not heal_loss.shares_prefix(pruned(teacher, [3]), teacher, 0)   # nothing below (lora, all)
        touched = pruned(teacher, [3])
        with torch.no_grad():
            find_layers(touched).layers[0].mlp.down_proj.weight[0, 0] += 1e-3   # a patch or a healing below
        assert not heal_loss.shares_prefix(touched, teacher, 1)

    @pytest.mark.parametrize("trainable, local", [("neighbours", 0), ("lora", 0), ("neighbours", 3)])
    def test_healing_resumed_from_its_checkpoint_ends_bit_identical(self, trainable, local):
        teacher = tiny_model("llama")
        data = blocks()  # 16 blocks = 8 micro-batches an epoch: with 3 per step, epochs end mid-step
        config = quick(trainable=trainable, grad_accum=3, checkpoint_every=2, local_steps=local)

        def run(resume=None):
            student = pruned(teacher, [3])
            saved = []
            job = job_for(student, config, [3], steps=5, resume=resume,
                          on_checkpoint=lambda state: saved.append(copy.deepcopy(state)))
            return student, heal(student, teacher, data, job, progress=False), saved

        whole, whole_log, saved = run()
        assert [state["step"] for state in saved] == [2, 4, 5]
        assert whole_log.resumed_at_step is None
        for state in saved[:2]:
            resumed, log, _ = run(resume=state)
            assert log.resumed_at_step == state["step"]
            assert log.rows == whole_log.rows
            for key, value in whole.state_dict().items():
                assert torch.equal(value, resumed.state_dict()[key]), key
















class TestLocalPhase:
    """--heal-local-steps: the first steps train the layers below the cut's mapped state alone."""

    def test_a_local_step_measures_the_global_steps_mse(self):
        """Same text, same weights: the first local step's MSE is the first global step's MSE term."""
        teacher = tiny_model("llama")
        first = {}
        for local in (0, 1):
            student = pruned(teacher, [3])
            log = heal(student, teacher, blocks(), job_for(student, quick(radius=1, local_steps=local), [3]),
                       progress=False)
            first[local] = log.rows[0]
        assert first[1]["phase"] == "local" and first[0]["phase"] == "global"
        assert first[1]["mse"] == pytest.approx(first[0]["mse"], rel=1e-5)
        assert first[1]["kl"] == 0.0 and first[1]["loss"] == pytest.approx(first[1]["mse"])

    def test_only_the_layers_up_to_the_mapped_state_change_and_the_mse_falls(self):
        teacher = tiny_model("llama")
        student = pruned(teacher, [3])
        before = {k: v.clone() for k, v in student.state_dict().items()}
        job = job_for(student, quick(steps=12, local_steps=12, radius=2), [3])
        assert job.layers == [1, 2, 3, 4] and job.pairs == [(3, 4)]   # layer 4 lies above the mapped state
        log = heal(student, teacher, blocks(), job, progress=False)
        changed = {k.split(".")[2] for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == {"1", "2", "3"}
        assert {row["phase"] for row in log.rows} == {"local"}
        assert log.rows[-1]["mse"] < 0.8 * log.rows[0]["mse"]

    def test_the_phases_follow_each_other_and_the_final_healing_has_none(self):
        teacher = tiny_model("llama")
        student = pruned(teacher, [3])
        log = heal(student, teacher, blocks(), job_for(student, quick(steps=5, local_steps=2), [3]), progress=False)
        assert [row["phase"] for row in log.rows] == ["local"] * 2 + ["global"] * 3
        assert plan(student, quick(local_steps=2), 3, iteration=2, seed=0, dropped=[]).local_steps == 0
        assert plan(student, quick(local_steps=9), 3, iteration=1, seed=0, dropped=[3]).local_steps == 3

    def test_cached_targets_and_prefix_give_the_same_local_losses(self, tmp_path):
        teacher = tiny_model("llama")
        data = blocks()
        runs = []
        for cached in (False, True):
            student = pruned(teacher, [3])
            targets = TeacherTargets.open(tmp_path / "t", teacher, data, topk=96, progress=False) if cached else None
            job = job_for(student, quick(steps=10, local_steps=10), [3], prefix_cache=cached)
            runs.append([row["mse"] for row in heal(student, teacher, data, job, targets, progress=False).rows])
        assert runs[0] == pytest.approx(runs[1], abs=1e-5)

    def test_no_trained_layer_below_the_mapped_state_is_one_line(self):
        student = pruned(tiny_model("llama"), [3])
        with pytest.raises(LayerpruneError, match="--heal-local-steps 0"):
            plan(student, HealConfig(radius=1, mse_layers=(0,), local_steps=2), 4, iteration=1, seed=0, dropped=[3])
