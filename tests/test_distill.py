import copy

import pytest
import torch

from layerprune.config import HealConfig
from layerprune.data import Corpus
from layerprune.distill import NonFiniteLoss, cut_positions, heal, trainable_layers
from layerprune.errors import LayerpruneError
from layerprune.surgery import find_layers, remove_layers
from layerprune.tasks import blocks_to_batches

from conftest import tiny_model


def corpus(seed=0, n=16, length=32):
    g = torch.Generator().manual_seed(seed)
    blocks = {split: torch.randint(3, 96, (n, length), generator=g) for split in ("calib", "train", "eval")}
    return Corpus(docs={}, blocks=blocks)


def quick(**kw):
    base = dict(steps=4, batch_size=2, grad_accum=1, warmup_steps=1, lr=1e-3, log_every=1)
    return HealConfig(**{**base, **kw})


def test_cut_positions_and_neighbours():
    assert cut_positions([3]) == [3]
    assert cut_positions([5, 2]) == [2, 4]
    assert trainable_layers(10, [4], HealConfig(radius=1)) == [3, 4]
    assert trainable_layers(10, [0], HealConfig(radius=2)) == [0, 1]
    assert trainable_layers(10, [4], HealConfig(trainable="all")) == list(range(10))


def test_student_equal_to_teacher_has_zero_loss():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    log = heal(student, teacher, corpus(), quick(steps=1, lr=1e-12), steps=1, progress=False)
    assert log["rows"][0]["loss"] == pytest.approx(0.0, abs=1e-6)


def test_only_the_neighbours_change_bit_for_bit():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    remove_layers(student, [3])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    log = heal(student, teacher, corpus(), quick(radius=1), steps=4, cuts=[3], progress=False)
    assert log["trained_layers_current"] == [2, 3]
    layers_prefix = "model.layers."
    for key, value in student.state_dict().items():
        trained = key.startswith((f"{layers_prefix}2.", f"{layers_prefix}3."))
        changed = not torch.equal(value, before[key])
        if not trained:
            assert not changed, key
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items() if k.startswith("model.layers.2."))
    assert not any(p.requires_grad for p in student.parameters())


def test_healing_lowers_held_out_kl():
    teacher = tiny_model("llama")
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(20)
    student = copy.deepcopy(teacher)
    remove_layers(student, [2])
    data = corpus()
    log = heal(student, teacher, data, quick(steps=30, lr=1e-3, warmup_steps=2, radius=1), steps=30, cuts=[2],
               eval_batches=blocks_to_batches(data.blocks["eval"], 4), progress=False)
    assert log["held_out_after"]["kl"] < 0.7 * log["held_out_before"]["kl"]


def test_lora_merges_back_into_plain_layers():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    remove_layers(student, [1])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    heal(student, teacher, corpus(), quick(trainable="lora", lora_r=4), steps=3, cuts=[1], progress=False)
    state = student.state_dict()
    assert set(state) == set(before)  # no adapter weights left behind
    assert type(find_layers(student).layers[0].self_attn.q_proj) is torch.nn.Linear
    assert any(not torch.equal(state[k], before[k]) for k in state if ".layers." in k)
    assert torch.equal(state["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_different_vocabularies_are_refused():
    teacher = tiny_model("llama")
    student = tiny_model("llama")
    student.resize_token_embeddings(120)
    with pytest.raises(LayerpruneError, match="vocabularies differ"):
        heal(student, teacher, corpus(), quick(), steps=1, progress=False)


def test_non_finite_loss_stops_and_keeps_weights():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        find_layers(student).layers[5].mlp.down_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(NonFiniteLoss, match="step 1"):
        heal(student, teacher, corpus(), quick(), steps=3, cuts=[5], progress=False)
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]) or torch.isnan(value).any()


@pytest.mark.parametrize("trainable", ["neighbours", "all"])
def test_cached_targets_give_the_straightforward_loss(tmp_path, trainable):
    from layerprune.targets import compute_targets

    teacher = tiny_model("llama")
    data = corpus()
    runs = {}
    for name in ("straight", "cached"):
        student = copy.deepcopy(teacher)
        remove_layers(student, [3])
        targets = compute_targets(teacher, data.blocks["train"], tmp_path / "t", topk=96, progress=False) \
            if name == "cached" else None
        runs[name] = heal(student, teacher, data, quick(trainable=trainable, grad_accum=2), steps=4, cuts=[3],
                          targets=targets, progress=False)
    for a, b in zip(runs["straight"]["rows"], runs["cached"]["rows"]):
        for key in ("loss", "kl", "mse", "final_mse"):
            assert a[key] == pytest.approx(b[key], abs=1e-4)


def test_teacher_layers_added_later_equal_those_captured_in_the_first_pass(tmp_path):
    from layerprune.targets import compute_targets

    teacher = tiny_model("qwen2")
    blocks = corpus().blocks["train"]
    eager = compute_targets(teacher, blocks, tmp_path / "a", topk=8, batch_size=3, progress=False, layers=[1, 4])
    lazy = compute_targets(teacher, blocks, tmp_path / "b", topk=8, batch_size=3, progress=False)
    assert lazy.layers == {}
    lazy.ensure_layers(teacher, [4, 1], progress=False)
    for o in (1, 4):
        assert (tmp_path / "b" / f"layer_{o}.npy").exists()
        assert abs(eager.layers[o] - lazy.layers[o]).max() < 1e-5
    assert eager.nbytes() == lazy.nbytes()


@pytest.mark.parametrize("trainable", ["neighbours", "lora"])
def test_healing_resumed_from_its_checkpoint_ends_bit_identical(trainable):
    teacher = tiny_model("llama")
    data = corpus()  # 16 blocks = 8 micro-batches an epoch: with 3 per step, epochs end mid-step
    config = quick(trainable=trainable, grad_accum=3, checkpoint_every=2)

    def run(resume=None):
        student = copy.deepcopy(teacher)
        remove_layers(student, [3])
        saved = []
        log = heal(student, teacher, data, config, steps=5, cuts=[3], progress=False, resume=resume,
                   on_checkpoint=lambda state: saved.append(copy.deepcopy(state)))
        return student, log, saved

    whole, whole_log, saved = run()
    assert [state["step"] for state in saved] == [2, 4, 5]
    assert "resumed_at_step" not in whole_log
    for state in saved[:2]:
        resumed, log, _ = run(resume=state)
        assert log["resumed_at_step"] == state["step"]
        assert log["rows"] == whole_log["rows"]
        for key, value in whole.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_complete_teacher_cache_is_reopened_and_a_different_one_recomputed(tmp_path):
    from layerprune.targets import compute_targets

    teacher = tiny_model("llama")
    blocks = corpus().blocks["train"]
    first = compute_targets(teacher, blocks, tmp_path / "t", topk=8, progress=False, layers=[2])
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    again = compute_targets(teacher, blocks, tmp_path / "t", topk=8, progress=False, layers=[2])
    assert calls == [] and (again.values == first.values).all() and list(again.layers) == [2]
    again.ensure_layers(teacher, [1], progress=False)  # a later cut: one more layer, kept in the manifest
    assert list(compute_targets(teacher, blocks, tmp_path / "t", topk=8, progress=False).layers) == [1, 2]
    calls.clear()
    compute_targets(teacher, blocks[:8], tmp_path / "t", topk=8, progress=False)  # other tokens
    assert calls
    handle.remove()
