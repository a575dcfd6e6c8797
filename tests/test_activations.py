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
    """The model runs on `ids` with another text's state injected at layer 2: what comes out is
    the other text's output, so the layers below were skipped and the state was taken."""
    model = tiny_model(arch)
    ids, mask = _inputs(pad=0)
    other = (ids * 7 + 5) % model.config.vocab_size
    _, logits = layer_states(model, ids, mask)
    states, other_logits = layer_states(model, other, mask)
    with injected(model, 2, states[2], range(2, 6)), capture(model, final=True) as record, torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(again, other_logits)
    assert not torch.allclose(again, logits, atol=1e-3)
    assert record["final"].shape == states[-1].shape
