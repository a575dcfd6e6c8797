import torch

from layerprune.targets import TeacherTargets

from common import tiny_model


def blocks(n=16, length=32):
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(0))


def test_top_k_values_and_lse_match_the_teacher(tmp_path):
    teacher = tiny_model("llama")
    data = blocks(4, 8)
    targets = TeacherTargets.open(tmp_path / "t", teacher, data, topk=5, batch_size=3, progress=False)
    with torch.no_grad():
        logits = teacher(input_ids=data).logits
    assert torch.allclose(torch.from_numpy(targets.values[:]), logits.topk(5, -1).values, atol=1e-5)
    assert torch.allclose(torch.from_numpy(targets.lse[:]), logits.logsumexp(-1), atol=1e-5)
    taken = targets.take(torch.tensor([2, 0]), [], "cpu")
    assert taken["values"].shape == (2, 8, 5) and taken["indices"].dtype == torch.long


def test_teacher_layers_added_later_equal_those_captured_in_the_first_pass(tmp_path):
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


def test_a_complete_cache_is_reopened_a_different_one_recomputed_and_close_deletes(tmp_path):
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
