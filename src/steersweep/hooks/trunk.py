"""Rows that share their first layers' steering run those layers once (`Trunk`, `shared_trunk`), and
activations recorded at chosen layers (`record`)."""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Mapping, Sequence

import torch
from torch import nn

from steersweep.hooks.layers import get_layers
from steersweep.hooks.rows import RowDelta, _on_hidden


class Trunk:
    """Which rows of a prompt pass compute alike at each decoder layer, so each is computed once.

    Row b's activation entering layer l depends on its tokens and on what the layers before l did
    to it; rows of one prompt steered at layer 14 and at layer 18 are identical up to layer 14.
    `classes[l][b]` numbers the distinct states entering layer l (l = 0..n; at n, after the last
    layer, every row is its own class, as the output head needs them all). The forward runs on
    one row per class of layer 0 and widens the batch after each layer whose steering splits a
    class, so an L-layer grid over one prompt costs the layers below the first steered one once.
    """

    def __init__(self, classes: list[list[int]]):
        self.classes = classes
        self.reps = [_firsts(c) for c in classes]  # per layer: the first row of each class

    @classmethod
    def plan(cls, inputs: Sequence[Hashable], deltas: Mapping[int, RowDelta], n_layers: int) -> Trunk | None:
        """Classes from per-row inputs (equal keys: equal token ids and mask) and each layer's
        per-row steering; None when no two rows share even their input."""
        n = len(inputs)
        first = _dense(inputs)
        if max(first, default=-1) + 1 == n:
            return None
        classes = [first]
        for layer in range(n_layers - 1):
            rd = deltas.get(layer)
            sig = rd.signatures() if rd is not None else [None] * n
            classes.append(_dense(list(zip(classes[-1], sig, strict=True))))
        classes.append(list(range(n)))
        return cls(classes)

    @property
    def feed(self) -> torch.Tensor:
        """The rows the forward is given: one per distinct input."""
        return torch.tensor(self.reps[0])

    def _map(self, src: int, dst: int) -> torch.Tensor | None:
        """Index taking layer `src`'s class rows to layer `dst`'s (None: the same rows)."""
        if len(self.reps[dst]) == len(self.reps[src]):
            return None
        return torch.tensor([self.classes[src][r] for r in self.reps[dst]])

    def _widen_inputs(self, layer: int):
        """Pre-hook: the model computes its mask and position embeddings once, for the fed rows;
        layer `layer` sees as many rows as it has classes."""
        index = self._map(0, layer)

        def widen(x):
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == len(self.reps[0]):
                return x[index.to(x.device)]
            if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
                return type(x)(widen(t) for t in x)  # (cos, sin) position embeddings
            return x

        def hook(module: nn.Module, args: tuple, kwargs: dict):  # noqa: ARG001
            if index is None:
                return None
            # the hidden states (first argument) arrive widened by the previous layer's hook
            return (args[0], *(widen(a) for a in args[1:])), {
                k: v if k == "hidden_states" else widen(v) for k, v in kwargs.items()
            }

        return hook

    def _widen_output(self, layer: int, rd: RowDelta | None):
        """Forward hook, ahead of any steering hook: split the classes this layer's steering tells
        apart, and point the steering at the rows the batch now holds."""
        index = self._map(layer, layer + 1)
        view = torch.tensor(self.reps[layer + 1])

        def hook(module: nn.Module, args: tuple, output):  # noqa: ARG001
            if rd is not None:
                rd.view = None if len(view) == rd.rows else view
            if index is None:
                return None
            return _on_hidden(output, lambda h: h[index.to(h.device)])

        return hook

    def widen_cache(self, cache) -> None:
        """Give every row its own entry in each layer's KV cache (layer l holds one per class)."""
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(self.classes) - 1:
            raise RuntimeError(
                f"a shared prompt pass needs one KV cache layer per decoder layer, got {type(cache).__name__}"
            )
        for layer, entry in zip(self.classes, layers, strict=False):
            if max(layer) + 1 < len(layer):
                entry.reorder_cache(torch.tensor(layer))


def _dense(keys: Sequence[Hashable]) -> list[int]:
    """Class number per key, in order of first appearance."""
    ids: dict = {}
    return [ids.setdefault(k, len(ids)) for k in keys]


def _firsts(classes: Sequence[int]) -> list[int]:
    """The first index of each class number 0, 1, ..."""
    out: dict[int, int] = {}
    for i, c in enumerate(classes):
        out.setdefault(c, i)
    return [out[c] for c in range(len(out))]


@contextlib.contextmanager
def shared_trunk(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    deltas: Mapping[int, RowDelta],
    layers_path: str | None = None,
) -> Iterator[Trunk | None]:
    """One prompt pass that computes each decoder layer once per distinct row state (`Trunk`).

    `input_ids` and `attention_mask` are the batch's (left-padded: rows of one prompt are equal).
    Inside the block, call the model on `trunk.feed`'s rows of the batch (the block yields None when
    no rows share their input: call it on all rows); its outputs have every row again, and
    `trunk.widen_cache(cache)` gives each row its KV cache. Use it around one full forward, inside
    `steer(model, deltas)`; equal to the unshared forward row for row (tests/test_trunk.py).
    """
    layers = get_layers(model, layers_path)
    inputs = list(zip(map(tuple, input_ids.tolist()), map(tuple, attention_mask.tolist()), strict=True))
    trunk = Trunk.plan(inputs, deltas, len(layers))
    if trunk is None:
        yield None
        return
    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(trunk._widen_inputs(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(trunk._widen_output(i, deltas.get(i)), prepend=True))
        yield trunk
    finally:
        for h in handles:
            h.remove()
        for rd in deltas.values():
            rd.view = None


@contextlib.contextmanager
def record(
    model: nn.Module, layers: Sequence[int], layers_path: str | None = None
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record each listed layer's output (the residual stream after it) on every forward call.

    Our own hooks, not `output_hidden_states`, whose lazily installed hooks may run before or after
    steering hooks depending on registration order.
    """
    blocks = get_layers(model, layers_path)
    store: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []

    def make(layer: int):
        def hook(module, args, output):  # noqa: ARG001
            h = output if isinstance(output, torch.Tensor) else output[0]
            store[layer].append(h.detach())

        return hook

    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(make(layer)))
        yield store
    finally:
        for h in handles:
            h.remove()


def contiguous_head(model: nn.Module) -> None:
    """Make the output head's input contiguous (once per model; idempotent).

    `logits_to_keep` hands the head a strided slice of the hidden states ([B, 1, d] out of
    [B, T, d]). With frozen weights (`requires_grad_(False)`), torch 2.13's matmul does not fold
    such a 3-D input into one matrix product: it expands the weight to [B, d, vocab] and copies it,
    which cost 0.55 s for 16 rows of the embedded model (49152 x 576, bf16) against 0.005 s for the
    contiguous input, and on a 70B model (128256 x 8192) would copy 2 GB per row in the prompt pass.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_steersweep_contiguous", False):
        return

    def pre_hook(module: nn.Module, args: tuple):  # noqa: ARG001
        return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)

    head.register_forward_pre_hook(pre_hook)
    head._steersweep_contiguous = True
