"""Find a model's decoder layers and steer their outputs, row by row, inside a context manager.

One `generate` call can carry rows with different layers, alphas and vectors: each row b gets
`delta[b] = alpha_b * v_b` added to the output of its own layer only. The hook runs after
accelerate's device hooks, so it sees the activation on the layer's execution device; the delta is
cast to that device and dtype once and cached, which is what fixes the cuda:0 vs cuda:3 mismatch of
field report 02 without giving up the KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

# Module paths of the decoder layer list, tried in order (Llama, Mistral, Qwen, Gemma, Phi, OLMo,
# Mixtral: model.layers; GPT-2/GPT-J: transformer.h; NeoX: gpt_neox.layers; OPT: decoder.layers;
# multimodal wrappers: language_model).
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "layers",
)


class LayerLookupError(ValueError):
    """The decoder layer list of a model could not be found."""


def get_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """Return the model's list of decoder layers.

    Args:
        model: a transformers causal LM (or any module holding a ModuleList of blocks).
        path: dotted attribute path that overrides auto-detection (config `model.layers_path`).
    """
    for candidate in (path,) if path else LAYER_PATHS:
        obj: object = model
        try:
            for part in candidate.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            if path:
                raise LayerLookupError(
                    f"model {type(model).__name__} has no attribute path '{path}': "
                    "fix model.layers_path (e.g. model.layers)"
                ) from None
            continue
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise LayerLookupError(
        f"cannot find the decoder layers of {type(model).__name__} (tried {', '.join(LAYER_PATHS)}): "
        "set model.layers_path=<dotted path to its nn.ModuleList of blocks>"
    )


def hook_name(layer: int) -> str:
    """TransformerLens name of the residual stream after `layer` (what the steering hook edits)."""
    return f"blocks.{layer}.hook_resid_post"


class RowDelta:
    """Per-row additive delta for one layer: a [B, H] float32 matrix, cached per device and dtype."""

    def __init__(self, delta: torch.Tensor, positions: str = "all"):
        if positions not in ("all", "generated"):
            raise ValueError(f"steering positions must be 'all' or 'generated', got {positions!r}")
        self.delta = delta.float()
        self.positions = positions
        self.rows = int(delta.shape[0])
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.calls = 0

    def on(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.delta.to(device=like.device, dtype=like.dtype)[:, None, :]
        return self._cache[key]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (indices into the current batch, in that order).

        The decode loop drops finished rows from the batch; every per-row state follows.
        """
        self.delta = self.delta[rows.cpu()]
        self.rows = int(self.delta.shape[0])
        self._cache = {k: v[rows.to(v.device)] for k, v in self._cache.items()}

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        d = self.on(h)
        if h.shape[0] != d.shape[0]:
            raise RuntimeError(f"steering hook got a batch of {h.shape[0]} rows but was built for {d.shape[0]}")
        if self.positions == "generated" and self.calls == 1 and h.shape[1] > 1:
            # Prefill: steer only the last prompt position, whose output predicts the first new
            # token; the prompt's own positions stay as the unsteered model computed them.
            out = h.clone()
            out[:, -1:, :] += d
            return out
        return h + d


def _steer_hook(rd: RowDelta):
    def hook(module: nn.Module, args: tuple, output):  # noqa: ARG001
        if isinstance(output, torch.Tensor):
            return rd.apply(output)
        if isinstance(output, tuple):  # older layers return (hidden, attn, ...): keep the type
            return (rd.apply(output[0]), *output[1:])
        if hasattr(output, "last_hidden_state"):  # ModelOutput-like
            output.last_hidden_state = rd.apply(output.last_hidden_state)
            return output
        raise TypeError(f"unexpected decoder layer output type {type(output).__name__}")

    return hook


def row_deltas(rows: Sequence[tuple[int, float, torch.Tensor]], positions: str = "all") -> dict[int, RowDelta]:
    """Group batch rows by layer: row b = (layer, alpha, vector) -> {layer: RowDelta([B, H])}.

    Rows on other layers get a zero delta for that layer, so they pass through unchanged
    (h + 0 == h exactly). Rows with alpha 0 add nothing anywhere.
    """
    if not rows:
        return {}
    width = int(rows[0][2].numel())
    out: dict[int, torch.Tensor] = {}
    for b, (layer, alpha, vec) in enumerate(rows):
        if alpha == 0:
            continue
        if layer not in out:
            out[layer] = torch.zeros(len(rows), width, dtype=torch.float32)
        out[layer][b] = float(alpha) * vec.detach().float().cpu().reshape(-1)
    return {layer: RowDelta(d, positions) for layer, d in out.items()}


@contextlib.contextmanager
def steer(
    model: nn.Module,
    deltas: Mapping[int, RowDelta],
    layers_path: str | None = None,
) -> Iterator[dict[int, RowDelta]]:
    """Add each layer's per-row delta to that layer's output while the context is open.

    Hooks are removed in `finally`, also when the body raises, so one loaded model serves every
    layer and alpha of a sweep. Create fresh deltas (`row_deltas`) for each generate call: they
    count calls to tell the prefill from decoding steps.
    """
    layers = get_layers(model, layers_path)
    handles = []
    try:
        for layer, rd in deltas.items():
            if not 0 <= layer < len(layers):
                raise IndexError(f"layer {layer} out of range: the model has {len(layers)} layers")
            handles.append(layers[layer].register_forward_hook(_steer_hook(rd)))
        yield dict(deltas)
    finally:
        for h in handles:
            h.remove()


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
