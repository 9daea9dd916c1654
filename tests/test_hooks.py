"""Exact identities of the steering hook on tiny random models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from steersweep.core.errors import LayerLookupError
from steersweep.hooks.layers import get_layers
from steersweep.hooks.rows import row_deltas, steer
from steersweep.hooks.trunk import record


def layer_outputs(model, ids, layers):
    with record(model, layers) as store:
        model(input_ids=ids)
    return {layer: store[layer][0].clone() for layer in layers}


def test_steered_output_is_original_plus_alpha_v_exactly(tiny):
    ids = torch.randint(3, 1000, (2, 7))
    v = torch.randn(32)
    alpha = 3.0
    base = layer_outputs(tiny, ids, [1, 2])
    # record() registers after steer(), so it sees the steered output of layer 1
    with steer(tiny, row_deltas([(1, alpha, v), (1, alpha, v)])):
        with record(tiny, [1]) as store:
            tiny(input_ids=ids)
    assert torch.equal(store[1][0], base[1] + alpha * v)


def test_other_layers_before_untouched_and_hooks_removed(tiny):
    ids = torch.randint(3, 1000, (1, 5))
    v = torch.randn(32)
    base = layer_outputs(tiny, ids, [0, 1])
    with steer(tiny, row_deltas([(1, 5.0, v)])):
        with record(tiny, [0]) as store:
            tiny(input_ids=ids)
    assert torch.equal(store[0][0], base[0])  # layer before the steered one: identical
    assert all(not block._forward_hooks for block in get_layers(tiny))


def test_hooks_removed_when_body_raises(tiny):
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny, row_deltas([(2, 1.0, torch.randn(32))])):
            assert get_layers(tiny)[2]._forward_hooks
            raise RuntimeError("boom")
    assert not get_layers(tiny)[2]._forward_hooks


def test_per_row_layers_and_alphas(tiny):
    """Row 0 steered at layer 1, row 1 at layer 2, row 2 unsteered: each equals its own single run."""
    ids = torch.randint(3, 1000, (3, 6))
    v1, v2 = torch.randn(32), torch.randn(32)
    rows = [(1, 2.0, v1), (2, -1.5, v2), (1, 0.0, v1)]
    with steer(tiny, row_deltas(rows)):
        batched = tiny(input_ids=ids).logits
    for b, row in enumerate(rows):
        with steer(tiny, row_deltas([row])):
            single = tiny(input_ids=ids[b : b + 1]).logits
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-5, atol=1e-5)
    plain = tiny(input_ids=ids[2:3]).logits
    torch.testing.assert_close(batched[2:3], plain, rtol=1e-5, atol=1e-5)


class TupleBlock(nn.Module):
    """A block in the older style: returns (hidden, extra)."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, h):
        return (self.lin(h), "extra")


class TupleModel(nn.Module):
    def __init__(self, width=8, n=3):
        super().__init__()
        self.layers = nn.ModuleList([TupleBlock(width) for _ in range(n)])

    def forward(self, h):
        outs = []
        for block in self.layers:
            h, extra = block(h)
            outs.append(h)
        return outs, extra


def test_tuple_outputs_keep_their_type_and_identity():
    torch.manual_seed(0)
    m = TupleModel()
    h = torch.randn(2, 4, 8)
    v = torch.randn(8)
    base, _ = m(h)
    with steer(m, row_deltas([(1, 2.5, v), (1, 2.5, v)])):
        steered, extra = m(h)
    assert extra == "extra"
    assert torch.equal(steered[0], base[0])
    assert torch.equal(steered[1], base[1] + 2.5 * v)


def test_generated_positions_only_steer_last_prompt_token_at_prefill(tiny):
    ids = torch.randint(3, 1000, (1, 6))
    v = torch.randn(32)
    base = layer_outputs(tiny, ids, [1])[1]
    with steer(tiny, row_deltas([(1, 1.0, v)], positions="generated")):
        with record(tiny, [1]) as store:
            tiny(input_ids=ids)
    out = store[1][0]
    assert torch.equal(out[:, :-1], base[:, :-1])
    assert torch.equal(out[:, -1], base[:, -1] + v)


def test_layer_lookup_error_says_how_to_fix():
    with pytest.raises(LayerLookupError, match="model.layers_path"):
        get_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(LayerLookupError, match="fix model.layers_path"):
        get_layers(TupleModel(), "transformer.h")
    assert len(get_layers(TupleModel(), "layers")) == 3


def test_bf16_delta_cast_to_activation_dtype():
    from conftest import tiny_llama

    m = tiny_llama(dtype=torch.bfloat16)
    ids = torch.randint(3, 1000, (1, 5))
    v = torch.randn(32)
    base = layer_outputs(m, ids, [2])[2]
    with steer(m, row_deltas([(2, 0.3, v)])):
        with record(m, [2]) as store:
            m(input_ids=ids)
    assert store[2][0].dtype == torch.bfloat16
    assert torch.equal(store[2][0], base + (0.3 * v).to(torch.bfloat16))
