import torch

import pytest

from layerprune.config import HealConfig
from layerprune.errors import LayerpruneError
from layerprune.healing.targets import TargetCache, TeacherTargets, check_budgets, plan_caches, target_bytes_per_block

from common import tiny_model


def blocks(n=16, length=32):
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(0))


class TestTeacherTargets:
    """The memory-mapped targets, reopened when complete."""

    def test_top_k_values_and_lse_match_the_teacher(self, tmp_path):
        teacher = tiny_model("llama")
        data = blocks(4, 8)
        targets = TeacherTargets.open(tmp_path / "t", teacher, data, topk=5, batch_size=3, progress=False)
        with torch.no_grad():
            logits = teacher(input_ids=data).logits
        assert torch.allclose(torch.from_numpy(targets.values[:]), logits.topk(5, -1).values, atol=1e-5)
        assert torch.allclose(torch.from_numpy(targets.lse[:]), logits.logsumexp(-1), atol=1e-5)
        taken = targets.take(torch.tensor([2, 0]), [], "cpu")
        assert taken["values"].shape == (2, 8, 5) and taken["indices"].dtype == torch.long

    def test_teacher_layers_added_later_equal_those_captured_in_the_first_pass(self, tmp_path):
        teacher = tiny_model("qwen2")
        data = blocks()
        eager = TeacherTargets.open(tmp_path / "a", teacher, data, topk=8, batch_size=3, progress=False, layers=[1, 4])
        lazy = TeacherTargets.open(tmp_path / "b", teacher, data, topk=8, batch_size=3, progress=False)
        assert lazy.layers == {}
        lazy.extend(teacher, [4, 1], progress=False)
        for o in (1, 4):
            assert (tmp_path / "b" / f"layer_{o}.npy").exists()
            assert abs(eager.layers[o] - lazy.layers[o]).max() < 1e-5
        assert eager.nbytes() == lazy.nbytes()

    def test_a_complete_cache_is_reopened_a_different_one_recomputed_and_close_deletes(self, tmp_path):
        teacher = tiny_model("llama")
        data = blocks()
        first = TeacherTargets.open(tmp_path / "t", teacher, data, topk=8, progress=False, layers=[2])
        calls = []
        handle = teacher.register_forward_hook(lambda *a: calls.append(1))
        again = TeacherTargets.open(tmp_path / "t", teacher, data, topk=8, progress=False, layers=[2])
        assert calls == [] and (again.values == first.values).all() and list(again.layers) == [2]
        again.extend(teacher, [1], progress=False)  # a later cut: one more layer, kept in the manifest
        assert list(TeacherTargets.open(tmp_path / "t", teacher, data, topk=8, progress=False).layers) == [1, 2]
        calls.clear()
        other = TeacherTargets.open(tmp_path / "t", teacher, data[:8], topk=8, progress=False)  # other tokens
        assert calls
        handle.remove()
        other.close()
        assert not (tmp_path / "t").exists()

    def test_bfloat16_states_are_stored_in_bfloat16(self, tmp_path):
        teacher = tiny_model("llama").to(torch.bfloat16)
        data = blocks(4, 8)
        targets = TeacherTargets.open(tmp_path / "t", teacher, data, topk=5, progress=False, layers=[2])
        assert targets.final.itemsize == 2 and targets.layers[2].itemsize == 2
        taken = targets.take(torch.tensor([1]), [2], "cpu")
        assert taken["final"].dtype == torch.bfloat16
        with torch.no_grad():
            from layerprune.activations import prefix_state

            expected = prefix_state(teacher, 3, data[1:2], torch.ones_like(data[1:2]))
        assert torch.equal(taken["layers"][0], expected)


class TestCachePolicy:
    def test_caches_only_what_is_read_again_within_budgets(self, tmp_path):
        teacher = tiny_model("llama")
        plan = plan_caches(HealConfig(), teacher, 32, 1000, tmp_path, reused=False)
        assert not plan.targets and not plan.prefix and "read once" in plan.why
        plan = plan_caches(HealConfig(train_data="reuse"), teacher, 32, 1000, tmp_path, reused=True)
        assert plan.targets and not plan.prefix
        plan = plan_caches(HealConfig(epochs=2), teacher, 32, 1000, tmp_path, reused=False)
        assert plan.targets and plan.prefix
        size = target_bytes_per_block(teacher, 32, 256)
        tight = HealConfig(epochs=2, cache_disk=999 * size / 2**30, cache_memory=1e-6)
        plan = plan_caches(tight, teacher, 32, 1000, tmp_path, reused=False)
        assert not plan.targets and "exceed --cache-disk" in plan.why
        assert not plan.prefix and "exceed --cache-memory" in plan.why
        plan = plan_caches(HealConfig(epochs=2, teacher_cache=False), teacher, 32, 1000, tmp_path, reused=True)
        assert not plan.targets and not plan.prefix

    def test_a_budget_too_small_for_one_block_is_refused(self):
        teacher = tiny_model("llama")
        with pytest.raises(LayerpruneError, match="--cache-disk 1e-09 GiB cannot hold"):
            check_budgets(HealConfig(cache_disk=1e-9), teacher, 32)
        check_budgets(HealConfig(cache_disk=1.0, cache_memory=1.0), teacher, 32)


class TestTargetCache:
    """The one place a run opens and closes its teacher targets."""

    @staticmethod
    def text(count):
        from layerprune.data import Blocks

        return Blocks.of(blocks(count, 8))

    def test_reused_text_opens_one_cache_for_every_healing_until_closed(self, tmp_path, monkeypatch):
        teacher, opened = tiny_model("llama"), []
        real = TeacherTargets.open.__func__
        monkeypatch.setattr(TeacherTargets, "open", classmethod(lambda cls, *a, **k: opened.append(a[0]) or
                                                                 real(cls, *a, **k)))
        cache = TargetCache(HealConfig(train_data="reuse"), teacher, 8, 2, tmp_path / "cache", progress=False)
        for iteration in (1, 2):
            with cache.healing(self.text(4), iteration) as (plan, targets):
                assert plan.targets and targets is cache.shared
        assert opened == [tmp_path / "cache"] and (tmp_path / "cache").exists()
        with cache.healing(self.text(2), 3) as (plan, targets):   # a final healing of another length
            assert targets is None and "holds other blocks" in plan.why
        cache.close()
        assert not (tmp_path / "cache").exists()

    def test_text_read_again_only_within_a_healing_gets_its_own_cache_deleted_after_it(self, tmp_path):
        cache = TargetCache(HealConfig(epochs=2), tiny_model("llama"), 8, 2, tmp_path / "cache", progress=False)
        with cache.healing(self.text(4), 1) as (plan, targets):
            assert plan.targets and targets.folder == tmp_path / "cache" / "iteration-1" and targets.folder.exists()
        assert not (tmp_path / "cache" / "iteration-1").exists() and cache.shared is None

    def test_text_read_once_is_not_cached(self, tmp_path):
        cache = TargetCache(HealConfig(), tiny_model("llama"), 8, 2, tmp_path / "cache", progress=False)
        with cache.healing(self.text(4), 1) as (plan, targets):
            assert targets is None and not plan.targets and not (tmp_path / "cache").exists()
