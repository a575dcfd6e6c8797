import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from layerprune.errors import LayerpruneError
from layerprune.surgery import MAP_KEY, find_layers, layer_view, num_layers, original_indices, remove_layers

from common import ALL_ARCHITECTURES, REFUSED_ARCHITECTURES, tiny_from_table, tiny_model


def _inputs(seed=1, batch=2, length=12, pad=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # left padding on one row
    return ids, mask


def skip_logits(model, skipped, ids, mask):
    """The original model with `skipped` layers turned into identities by hooks."""
    def identity(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handles = [find_layers(model).layers[i].register_forward_hook(identity, with_kwargs=True) for i in skipped]
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def test_find_layers_every_architecture(arch):
    model = tiny_model(arch)
    assert len(find_layers(model).layers) == 6


@pytest.mark.parametrize("drop", [[0], [2], [5], [1, 4]])
def test_pruned_logits_equal_skipped_forward(arch, drop):
    model = tiny_model(arch)
    ids, mask = _inputs()
    expected = skip_logits(model, drop, ids, mask)
    pruned = copy.deepcopy(model)
    removed = remove_layers(pruned, drop)
    assert removed == drop
    with torch.no_grad():
        got = pruned(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_config_and_cache_slots_follow_the_cut(arch):
    model = tiny_model(arch)
    types = getattr(model.config, "layer_types", None)
    remove_layers(model, [1])
    remove_layers(model, [2])  # original layer 3
    assert original_indices(model) == [0, 2, 4, 5]
    assert model.config.num_hidden_layers == 4 == num_layers(model)
    if types is not None:
        assert model.config.layer_types == [types[o] for o in [0, 2, 4, 5]]
    if arch == "qwen2":  # layers below max_window_layers=3: originals 0 and 2
        assert model.config.max_window_layers == 2
    for index, layer in enumerate(find_layers(model).layers):
        slots = [m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        assert slots and all(s == index for s in slots)


def test_save_reload_and_generate_with_cache(arch, tmp_path):
    model = tiny_model(arch)
    remove_layers(model, [2])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 5
    assert getattr(reloaded.config, MAP_KEY) == [0, 1, 3, 4, 5]
    ids, mask = _inputs(pad=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
        cached = reloaded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True,
                                   pad_token_id=0)
        uncached = reloaded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False,
                                     pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_layer_view_restores_everything(arch):
    model = tiny_model(arch)
    before = copy.deepcopy(model.config.to_dict())
    layers = list(find_layers(model).layers)
    with layer_view(model, [0, 3, 5]):
        assert num_layers(model) == 3 and model.config.num_hidden_layers == 3
    assert list(find_layers(model).layers) == layers
    assert model.config.to_dict() == before
    for index, layer in enumerate(layers):
        assert all(m.layer_idx == index for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))


def test_unsupported_architecture_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(LayerpruneError, match="cannot find the decoder layers"):
        find_layers(Flat())


@pytest.mark.parametrize("arch_name", sorted(ALL_ARCHITECTURES))
def test_every_architecture_prunes_reloads_complete_and_equal(arch_name, tmp_path):
    """Every per-layer config pattern follows the cut: nothing missing or re-initialised on reload."""
    model = tiny_from_table(arch_name)
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    expected = skip_logits(model, [1, 4], ids, torch.ones_like(ids))
    remove_layers(model, [1])
    remove_layers(model, [3])  # original layer 4
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch_name", sorted(REFUSED_ARCHITECTURES))
def test_architectures_whose_pattern_cannot_follow_a_cut_are_refused(arch_name):
    model = tiny_from_table(arch_name)
    with pytest.raises(LayerpruneError, match="cannot prune this architecture"):
        remove_layers(model, [1])
    assert num_layers(model) == 6  # untouched


def test_a_cut_the_config_cannot_describe_is_refused(monkeypatch):
    """The structural check catches a pattern the surgery does not know: here a MoE index list
    that is (wrongly) not renumbered."""
    from layerprune import surgery

    monkeypatch.setattr(surgery, "INDEX_KEYS", ())
    model = tiny_from_table("llama4_text")
    with pytest.raises(LayerpruneError, match="no longer describes its weights"):
        remove_layers(model, [0])


def test_qwen_moe_sparse_step_becomes_an_explicit_list():
    model = tiny_from_table("qwen2_moe")  # step 2, layer 0 dense: sparse layers 1, 3, 5
    remove_layers(model, [2])
    config = model.config
    assert config.decoder_sparse_step == 1 and config.mlp_only_layers == [0, 3]  # originals 0 and 4 stay dense
