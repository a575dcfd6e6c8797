import pytest
import torch

from layerprune.activations import capture, injected, layer_states, prefix_state, run_from

from common import tiny_model
from test_surgery import _inputs, skip_logits


@pytest.mark.parametrize("removed", [0, 3, 5])
def test_run_from_cached_state_equals_full_candidate(arch, removed):
    model = tiny_model(arch)
    ids, mask = _inputs()
    states, _ = layer_states(model, ids, mask)
    fast = run_from(model, removed, states[removed], range(removed + 1, 6), ids, mask)
    full = skip_logits(model, [removed], ids, mask)
    real = mask.bool()
    torch.testing.assert_close(fast[real], full[real], rtol=1e-5, atol=1e-5)


def test_prefix_state_is_the_state_entering_the_layer(arch):
    model = tiny_model(arch)
    ids, mask = _inputs(pad=0)
    states, _ = layer_states(model, ids, mask)
    torch.testing.assert_close(prefix_state(model, 3, ids, mask), states[3])


def test_injected_state_replaces_the_layers_below(arch):
    model = tiny_model(arch)
    ids, mask = _inputs(pad=0)
    states, logits = layer_states(model, ids, mask)
    with injected(model, 2, states[2], range(2, 6)), capture(model, final=True) as record, torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(again, logits)
    assert record["final"].shape == states[-1].shape
