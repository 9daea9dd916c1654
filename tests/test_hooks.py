"""Exact identities of the steering hooks (hooks.layers, hooks.rows) on tiny random models: the injection
modes, the steered positions, one row steering a set of layers."""

from __future__ import annotations

import pytest
import torch
from helpers.steering import plain_mode
from torch import nn

from steersweep.core.errors import LayerLookupError
from steersweep.hooks.layers import get_layers
from steersweep.hooks.rows import MODES, RowDelta, row_deltas, steer
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
    from helpers.models import tiny_llama

    m = tiny_llama(dtype=torch.bfloat16)
    ids = torch.randint(3, 1000, (1, 5))
    v = torch.randn(32)
    base = layer_outputs(m, ids, [2])[2]
    with steer(m, row_deltas([(2, 0.3, v)])):
        with record(m, [2]) as store:
            m(input_ids=ids)
    assert store[2][0].dtype == torch.bfloat16
    assert torch.equal(store[2][0], base + (0.3 * v).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# Injection modes: exact identities


def layer_out(model, ids, layer, rows=None, positions="all"):
    """Output of `layer` (record registers after steer, so it sees the steered state)."""
    with steer(model, row_deltas(rows, positions) if rows else {}):
        with record(model, [layer]) as store:
            model(input_ids=ids)
    return store[layer][0].clone()


def test_ablate_leaves_no_component_along_u(tiny):
    ids = torch.randint(3, 1000, (2, 7))
    v = torch.randn(32) * 3
    u = v / v.norm()
    base = layer_out(tiny, ids, 1)
    out = layer_out(tiny, ids, 1, [(1, 2.0, v, "ablate")] * 2)
    assert (base @ u).abs().max() > 1e-2  # there was something to remove
    assert (out @ u).abs().max() <= 1e-6 * base.norm(dim=-1).max()
    torch.testing.assert_close(out, base - (base @ u)[..., None] * u, rtol=0, atol=1e-5)
    # alpha only switches ablation on: any non-zero alpha removes the whole component
    assert torch.equal(layer_out(tiny, ids, 1, [(1, -7.0, v, "ablate")] * 2), out)


def test_norm_preserving_keeps_each_position_norm(tiny):
    ids = torch.randint(3, 1000, (2, 7))
    v = torch.randn(32) * 3
    base = layer_out(tiny, ids, 2)
    out = layer_out(tiny, ids, 2, [(2, 3.0, v, "norm_preserving")] * 2)
    torch.testing.assert_close(out.norm(dim=-1), base.norm(dim=-1), rtol=1e-6, atol=0)
    cos = torch.nn.functional.cosine_similarity(out, base + 3.0 * v, dim=-1)
    assert (cos > 1 - 1e-6).all()  # the direction of h + alpha v
    assert (out - base).abs().max() > 0.1


def test_ablate_add_equals_ablate_then_add(tiny):
    ids = torch.randint(3, 1000, (2, 6))
    v = torch.randn(32)
    ablated = layer_out(tiny, ids, 1, [(1, 1.0, v, "ablate")] * 2)
    both = layer_out(tiny, ids, 1, [(1, 2.5, v, "ablate_add")] * 2)
    assert torch.equal(both, ablated + 2.5 * v)


@pytest.mark.parametrize("mode", MODES)
def test_alpha_zero_is_unsteered_in_every_mode(tiny, mode):
    ids = torch.randint(3, 1000, (2, 6))
    assert torch.equal(layer_out(tiny, ids, 1, [(1, 0.0, torch.randn(32), mode)] * 2), layer_out(tiny, ids, 1))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="use one of add, ablate, ablate_add, norm_preserving"):
        row_deltas([(1, 1.0, torch.randn(4), "subtract")])


def test_mixed_modes_and_layers_in_one_batch_equal_single_rows(tiny):
    ids = torch.randint(3, 1000, (5, 6))
    v1, v2 = torch.randn(32), torch.randn(32)
    rows = [(1, 2.0, v1, "add"), (2, 1.0, v2, "ablate"), (1, -1.5, v1, "ablate_add"),
            (2, 3.0, v2, "norm_preserving"), (1, 0.0, v1, "ablate")]  # fmt: skip
    with steer(tiny, row_deltas(rows)):
        batched = tiny(input_ids=ids).logits
    plain = tiny(input_ids=ids).logits
    for b, row in enumerate(rows):
        with steer(tiny, row_deltas([row])):
            single = tiny(input_ids=ids[b : b + 1]).logits
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-5, atol=1e-5)
        # and each mode really is its formula at its layer (a hand-made hook on the plain model)
        layer, alpha, v, mode = row

        def hook(module, args, out, alpha=alpha, v=v, mode=mode):  # noqa: ARG001
            return plain_mode(out, v, alpha, mode)

        handle = get_layers(tiny)[layer].register_forward_hook(hook)
        try:
            ref = tiny(input_ids=ids[b : b + 1]).logits
        finally:
            handle.remove()
        torch.testing.assert_close(single, ref, rtol=1e-4, atol=1e-4)
        if alpha != 0:
            assert (single - plain[b : b + 1]).abs().max() > 1e-3


def test_row_delta_keep_follows_every_row_state():
    """The decode loop drops finished rows: modes, directions, norms flags and lengths follow."""
    torch.manual_seed(0)
    v, w = torch.randn(8), torch.randn(8)
    rows = [(1, 2.0, v, "add"), (1, 1.0, w, "ablate"), (1, -1.0, v, "ablate_add"), (1, 3.0, w, "norm_preserving")]
    lengths = [5, 4, 2, 3]
    full = row_deltas(rows, "from:3", lengths)[1]
    kept = row_deltas(rows, "from:3", lengths)[1]
    h = torch.randn(4, 5, 8)
    assert torch.equal(full.apply(h), kept.apply(h))  # prefill: caches filled before keep
    steps = [torch.randn(4, 1, 8) for _ in range(3)]
    assert torch.equal(full.apply(steps[0]), kept.apply(steps[0]))
    keep = torch.tensor([3, 1, 2])
    kept.keep(keep)
    for s in steps[1:]:
        want = full.apply(s)[keep]
        assert torch.equal(kept.apply(s[keep]), want)
    assert kept.rows == 3


# ---------------------------------------------------------------------------------------------
# Steered positions


def changed(rd: RowDelta, h: torch.Tensor) -> list[list[int]]:
    out = rd.apply(h)
    return [[int(x) for x in row] for row in (out != h).any(-1)]


@pytest.mark.parametrize(
    "positions, prefill, step",
    [
        ("all", [[1] * 6, [1] * 6], [[1], [1]]),
        ("prompt", [[1] * 6, [1] * 6], [[0], [0]]),
        ("generated", [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]], [[1], [1]]),
        # row 1 is left-padded by 3: its token 2 sits in column 5; after the prefill, token 6 / 3
        ("from:2", [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], [[1], [1]]),
        ("from:4", [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], [[1], [0]]),
    ],
)
def test_positions_steer_the_right_tokens(positions, prefill, step):
    rd = row_deltas([(0, 1.0, torch.ones(4)), (0, 1.0, torch.ones(4))], positions, lengths=[6, 3])[0]
    assert changed(rd, torch.randn(2, 6, 4)) == prefill
    assert changed(rd, torch.randn(2, 1, 4)) == step
    if positions == "from:4":  # row 1 reaches token 4 at its second generated token
        assert changed(rd, torch.randn(2, 1, 4)) == [[1], [1]]


def test_from_k_needs_lengths_and_bad_positions_are_refused():
    with pytest.raises(ValueError, match="lengths"):
        row_deltas([(0, 1.0, torch.ones(4))], "from:2")
    with pytest.raises(ValueError, match="use all, prompt, generated or from:K"):
        row_deltas([(0, 1.0, torch.ones(4))], "from:-1", lengths=[3])


# ---------------------------------------------------------------------------------------------
# Layer sets: one row steering several layers


def test_a_row_steering_a_set_of_layers_equals_hand_hooks_on_each(tiny):
    """A row made of parts on several layers applies each layer's own vector and mode, as hooks
    written by hand on those layers do; mixed with single-layer rows in one batch, it equals its own
    single-row forward."""
    ids = torch.randint(3, 1000, (3, 6))
    v = {layer: torch.randn(32) * 2 for layer in range(4)}
    multi = [(1, 1.5, v[1], "ablate_add"), (3, 1.5, v[3], "ablate_add")]
    rows = [multi, (2, -1.0, v[2], "add"), [(layer, 1.0, v[layer], "ablate") for layer in range(4)]]
    with steer(tiny, row_deltas(rows)):
        batched = tiny(input_ids=ids).logits
    for b, row in enumerate(rows):
        with steer(tiny, row_deltas([row])):
            single = tiny(input_ids=ids[b : b + 1]).logits
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-5, atol=1e-5)
        parts = row if isinstance(row, list) else [row]
        handles = []
        for layer, alpha, vec, mode in parts:

            def hook(module, args, out, alpha=alpha, vec=vec, mode=mode):  # noqa: ARG001
                return plain_mode(out, vec, alpha, mode)

            handles.append(get_layers(tiny)[layer].register_forward_hook(hook))
        try:
            ref = tiny(input_ids=ids[b : b + 1]).logits
        finally:
            for h in handles:
                h.remove()
        torch.testing.assert_close(single, ref, rtol=1e-4, atol=1e-4)


def test_ablating_one_direction_at_every_layer_leaves_no_component_anywhere(tiny):
    """The refusal-ablation case: one unit direction projected out after every layer; each layer's
    output then has no component along it (recorded after the steering hooks)."""
    ids = torch.randint(3, 1000, (2, 7))
    u = torch.randn(32)
    n = len(get_layers(tiny))
    row = [(layer, 1.0, u, "ablate") for layer in range(n)]
    with steer(tiny, row_deltas([row, row])), record(tiny, list(range(n))) as store:
        tiny(input_ids=ids)
    for layer in range(n):
        proj = store[layer][0] @ (u / u.norm())
        assert proj.abs().max() < 1e-4, (layer, proj.abs().max())
    with record(tiny, [n - 1]) as plain:
        tiny(input_ids=ids)
    assert (plain[n - 1][0] @ (u / u.norm())).abs().max() > 1e-2  # the plain model has such a component
