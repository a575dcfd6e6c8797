"""KL from the teacher's moments through the shared LM head: equal to KL from its logits, the
teacher run once per batch for every later evaluation, and the logits used wherever the identity
does not hold (a capped head, a student that trained its head)."""

import copy

import pytest
import torch

from layerprune.importance import ScoringContext, score_layers
from layerprune.tasks import TaskData, build_tasks, evaluate_tasks
from layerprune.tasks.interval import evaluate_rows
from layerprune.heads import same_head
from layerprune.tasks.engine import MomentsMemo
from layerprune.tasks.stats import token_kl

from common import tiny_from_table, tiny_model


def _blocks(n=6, length=24, seed=0):
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def _perturbed(teacher, scale=0.05, seed=1):
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "layers" in name:
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    return student


class CountingForward:
    """Counts the teacher's forward passes (its deep copies inherit the hook, and are not counted)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(lambda m, a, k: self.count(m is model), with_kwargs=True)

    def count(self, mine: bool):
        self.calls += mine


def _kl_by_logits(student, teacher, blocks):
    with torch.no_grad():
        s, t = student(input_ids=blocks).logits, teacher(input_ids=blocks).logits
    return float(token_kl(s, t).mean())


class TestMoments:
    def test_kl_from_moments_equals_kl_from_logits(self):
        teacher = tiny_model("llama")
        student = _perturbed(teacher)
        blocks = _blocks()
        tasks = build_tasks(["kl"], TaskData(None, blocks, [], 4))
        assert same_head(student, teacher)
        first = evaluate_tasks(student, tasks, teacher)["kl"]["kl"]
        assert tasks[0].memo.usable and len(tasks[0].memo.batches) == 2   # kept for both batches
        assert first == pytest.approx(_kl_by_logits(student, teacher, blocks), rel=1e-5)
        assert first > 1e-3

    def test_the_teacher_runs_once_for_every_later_evaluation(self):
        teacher = tiny_model("llama")
        counter = CountingForward(teacher)
        blocks = _blocks()
        tasks = build_tasks(["perplexity", "kl"], TaskData(None, blocks, [], 4))
        figures = [evaluate_tasks(_perturbed(teacher, seed=s), tasks, teacher)["kl"]["kl"] for s in (1, 2, 3)]
        assert counter.calls == 2   # two batches, once
        assert len(set(figures)) == 3
        rows = evaluate_rows(_perturbed(teacher, seed=1), tasks, teacher)   # per-block statistics too
        assert counter.calls == 2 and rows[0]["kl"]["kl"] == pytest.approx(figures[0], rel=1e-6)

    def test_the_teachers_own_evaluation_fills_the_memo(self):
        """The run scores the teacher on the held-out text first (its reference figures): that
        pass keeps the moments, so no student evaluation runs the teacher there again."""
        teacher = tiny_model("llama")
        blocks = _blocks()
        tasks = build_tasks(["perplexity", "kl"], TaskData(None, blocks, [], 4))
        rows = evaluate_rows(teacher, tasks, teacher)
        assert rows[0]["kl"]["kl"] == pytest.approx(0.0, abs=1e-6) and len(tasks[0].batches) == 2
        counter = CountingForward(teacher)
        student = _perturbed(teacher)
        kl = evaluate_tasks(student, tasks, teacher)["kl"]["kl"]
        assert counter.calls == 0
        assert kl == pytest.approx(_kl_by_logits(student, teacher, blocks), rel=1e-5) and kl > 1e-3

    def test_a_student_that_trained_its_head_is_compared_with_the_teachers_logits(self):
        teacher = tiny_model("llama")
        counter = CountingForward(teacher)
        student = _perturbed(teacher)
        with torch.no_grad():
            student.lm_head.weight.mul_(1.1)
        blocks = _blocks()
        tasks = build_tasks(["kl"], TaskData(None, blocks, [], 4))
        assert not same_head(student, teacher)
        kl = evaluate_tasks(student, tasks, teacher)["kl"]["kl"]
        evaluate_tasks(student, tasks, teacher)
        assert counter.calls == 4 and not tasks[0].memo.batches
        assert kl == pytest.approx(_kl_by_logits(student, teacher, blocks), rel=1e-6)

    def test_a_capped_head_is_found_out_and_the_logits_used(self):
        teacher = tiny_from_table("gemma2")   # final_logit_softcapping: logits are not the head's linear map
        teacher.config.final_logit_softcapping = 0.5   # the random model's logits are small: cap them hard
        student = _perturbed(teacher)
        blocks = _blocks()
        tasks = build_tasks(["kl"], TaskData(None, blocks, [], 4))
        kl = evaluate_tasks(student, tasks, teacher)["kl"]["kl"]
        assert not tasks[0].memo.usable
        assert kl == pytest.approx(_kl_by_logits(student, teacher, blocks), rel=1e-6)

    def test_another_teacher_starts_the_memo_again(self):
        blocks = _blocks(n=2)
        tasks = build_tasks(["kl"], TaskData(None, blocks, [], 2))
        first, second = tiny_model("llama", seed=0), tiny_model("llama", seed=5)
        student = _perturbed(first)
        evaluate_tasks(student, tasks, first)
        kept = tasks[0].memo.batches[0].lse.clone()
        evaluate_tasks(_perturbed(second), tasks, second)
        assert not torch.equal(kept, tasks[0].memo.batches[0].lse)
        assert isinstance(tasks[0].memo, MomentsMemo)

    def test_candidate_scoring_with_moments_equals_scoring_with_logits(self):
        teacher = tiny_model("llama")
        student = _perturbed(teacher)
        blocks = _blocks(n=4)
        data = TaskData(None, blocks, [], 2)
        tasks = build_tasks(["perplexity", "token_accuracy", "kl"], data)
        reference = evaluate_tasks(teacher, tasks, teacher)
        context = ScoringContext(tasks[0].batches, tasks, teacher, reference, progress=False)
        scores = score_layers(student, "quality", context)
        assert tasks[2].memo.batches   # the candidates were compared through the moments
        plain = build_tasks(["perplexity", "token_accuracy", "kl"], data)
        for task in plain:
            task.memo = None
        expected = score_layers(student, "quality", ScoringContext(plain[0].batches, plain, teacher, reference,
                                                                 progress=False))
        assert scores == pytest.approx(expected, rel=1e-4, abs=1e-6)


class TestHeadByRows:
    """Past ROW_HEAD_BYTES a batch's logits are made a row at a time from the final norm's output:
    the same statistics, evaluations and scores as from the whole batch's logits."""

    def _figures(self, student, teacher, blocks):
        tasks = build_tasks(["perplexity", "token_accuracy", "kl"], TaskData(None, blocks, [], 3))
        evaluate_rows(teacher, tasks, teacher)   # the teacher's own pass, as a run makes it first
        reference = evaluate_tasks(teacher, tasks, teacher)
        scores = score_layers(student, "quality", ScoringContext(tasks[0].batches, tasks, teacher, reference,
                                                                 progress=False))
        return evaluate_tasks(student, tasks, teacher), evaluate_rows(student, tasks, teacher), scores

    def test_rows_give_the_whole_batchs_figures(self, monkeypatch):
        from layerprune.tasks import engine

        teacher = tiny_model("llama")
        student = _perturbed(teacher)
        blocks = _blocks(n=6)
        whole = self._figures(student, teacher, blocks)
        heads = []
        student.lm_head.register_forward_hook(lambda m, args, out: heads.append(tuple(out.shape)))
        monkeypatch.setattr(engine, "ROW_HEAD_BYTES", 0)
        rows = self._figures(student, teacher, blocks)
        # each row whole through the head, never a batch (nor its last positions: the head is not run
        # for the forward that makes the final states); (1, 8) is the probe of a plain linear head
        assert heads and set(heads) <= {(1, blocks.shape[1], 96), (1, 8, 96)}
        assert (1, blocks.shape[1], 96) in heads
        for name in whole[0]:
            for key, value in whole[0][name].items():
                assert rows[0][name][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
        for task in ("kl", "perplexity"):
            key = {"kl": "kl_sum", "perplexity": "nll_sum"}[task]
            assert [row[key] for row in rows[1][1][task]] == pytest.approx([row[key] for row in whole[1][1][task]],
                                                                            rel=1e-5, abs=1e-7)
        assert rows[2] == pytest.approx(whole[2], rel=1e-4, abs=1e-6)

    def test_the_teachers_moments_are_made_a_row_at_a_time_too(self, monkeypatch):
        from layerprune.tasks import engine

        teacher = tiny_model("llama")
        student = _perturbed(teacher)
        blocks = _blocks(n=6)
        whole = evaluate_tasks(student, build_tasks(["kl"], TaskData(None, blocks, [], 3)), teacher)["kl"]["kl"]
        monkeypatch.setattr(engine, "ROW_HEAD_BYTES", 0)
        heads = []
        teacher.lm_head.register_forward_hook(lambda m, args, out: heads.append(tuple(out.shape)))
        tasks = build_tasks(["kl"], TaskData(None, blocks, [], 3))
        rows = evaluate_tasks(student, tasks, teacher)["kl"]["kl"]
        assert len(tasks[0].memo.batches) == 2   # a row is [T, V]; never [B, T, V] with B and T over 1
        assert heads and not any(len(shape) == 3 and shape[0] > 1 and shape[1] > 1 for shape in heads)
        assert rows == pytest.approx(whole, rel=1e-5)

    def test_the_teacher_scoring_itself_goes_by_rows_and_fills_the_memo(self, monkeypatch):
        """The run's first pass (the teacher against itself) makes no batch-wide logits either: its
        moments come from its final state, its own KL is nil, and the student's later KL, through
        that memo, is the one from whole logits."""
        from layerprune.tasks import engine

        teacher = tiny_model("llama")
        student = _perturbed(teacher)
        blocks = _blocks(n=6)
        whole = evaluate_tasks(student, build_tasks(["kl"], TaskData(None, blocks, [], 3)), teacher)["kl"]["kl"]
        monkeypatch.setattr(engine, "ROW_HEAD_BYTES", 0)
        shapes = []
        teacher.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
        tasks = build_tasks(["kl"], TaskData(None, blocks, [], 3))
        own, _ = evaluate_rows(teacher, tasks, teacher)
        assert len(tasks[0].memo.batches) == 2 and own["kl"]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert shapes and not [shape for shape in shapes if len(shape) == 3 and shape[0] > 1 and shape[1] > 1]
        made = len(shapes)
        assert evaluate_tasks(student, tasks, teacher)["kl"]["kl"] == pytest.approx(whole, rel=1e-5)
        assert len(shapes) == made   # the student's KL ran from the memo: the teacher's head never again

    def test_a_capped_head_keeps_the_whole_logits(self, monkeypatch):
        from layerprune.tasks import engine

        teacher = tiny_from_table("gemma2")
        teacher.config.final_logit_softcapping = 0.5
        student = _perturbed(teacher)
        blocks = _blocks(n=6)
        whole = self._figures(student, teacher, blocks)
        monkeypatch.setattr(engine, "ROW_HEAD_BYTES", 0)
        rows = self._figures(student, teacher, blocks)
        assert not engine.head_by_rows(student, build_tasks(["kl"], TaskData(None, blocks, [], 3))[0].batches[0])
        assert rows[0] == whole[0]
