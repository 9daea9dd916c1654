"""Steer the decoder layers' outputs, row by row, inside a context manager (`steer`, `RowDelta`).

One `generate` call can carry rows with different layers, alphas, vectors and modes: each row b is
steered at the output of its own layer only, by its own mode (`MODES`: add `alpha_b * v_b`, ablate
the direction, ablate then add, add at constant norm), on the positions `steering.positions` names.
The hook runs after accelerate's device hooks, so it sees the activation on the layer's execution
device; the per-row tensors are cast to that device and dtype once and cached, which is what fixes
the cuda:0 vs cuda:3 mismatch of field report 02 without giving up the KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from steersweep.hooks.layers import get_layers

# How a row's direction acts on the residual stream h at a steered position (u = v / |v|):
#   add              h + alpha v
#   ablate           h - (h.u) u            (directional ablation; alpha only switches it on: alpha 0 = unsteered)
#   ablate_add       h - (h.u) u + alpha v
#   norm_preserving  (h + alpha v) |h| / |h + alpha v|
# In every mode alpha 0 is the unsteered model, so a sweep's baseline is one row whatever the mode.
MODES = ("add", "ablate", "ablate_add", "norm_preserving")
POSITIONS_HELP = "use all, prompt, generated or from:K (K >= 0: steer token K of the prompt onward)"


def parse_positions(spec: str) -> tuple[str, int]:
    """`steering.positions` -> (kind, k): all | prompt | generated | from:K (k is K, else 0).

    all: every position. prompt: the prompt's positions (the prefill), generated tokens run free.
    generated: the last prompt position (whose output predicts the first new token) onward.
    from:K: token K of the row's own sequence onward (0 = its first prompt token, padding excluded).
    """
    spec = str(spec).strip()
    if spec in ("all", "prompt", "generated"):
        return spec, 0
    if spec.startswith("from:") and spec[5:].isdigit():
        return "from", int(spec[5:])
    raise ValueError(f"steering positions {spec!r}: {POSITIONS_HELP}")


def row_mode(row: Sequence) -> str:
    """The mode of a row spec (layer, alpha, vector[, mode]); 3-tuples add."""
    return str(row[3]) if len(row) > 3 else "add"


def row_parts(row: Sequence) -> list[Sequence]:
    """A row's steering as parts: a row is one part (layer, alpha, vector[, mode]) or a list of them
    (a cell that steers several layers, each with its own vector)."""
    if len(row) and isinstance(row[0], (tuple, list)):
        return list(row)
    return [row] if len(row) else []


def row_key(row: Sequence) -> tuple | None:
    """What makes two rows steer alike: None for alpha 0 (the unsteered model in every mode)."""
    keys = tuple(
        (part[0], float(part[1]), id(part[2]), row_mode(part)) for part in row_parts(row) if float(part[1]) != 0
    )
    return keys or None


class RowDelta:
    """Per-row steering of one layer: [B, H] float32 tensors, cached per device and dtype.

    Args:
        delta: per-row `alpha * v` added after any ablation (zero for rows that add nothing).
        positions: see `parse_positions`.
        units: per-row unit direction projected out (zero rows: no ablation); None = no row ablates.
        renorm: per-row flag: rescale the steered state to the norm it had before (norm_preserving).
        lengths: per-row prompt length in tokens (needed by `from:K` only).
        every_row: the tensors hold one row that steers every row of a batch of any size (the public
            `steersweep.steering` with one layer and alpha); otherwise the batch must have their rows.
    """

    def __init__(
        self,
        delta: torch.Tensor,
        positions: str = "all",
        units: torch.Tensor | None = None,
        renorm: torch.Tensor | None = None,
        lengths: Sequence[int] | torch.Tensor | None = None,
        every_row: bool = False,
    ):
        self.kind, self.k = parse_positions(positions)
        if self.kind == "from" and lengths is None:
            raise ValueError("steering positions from:K need each row's prompt length (lengths=...)")
        self.delta = delta.float()
        self.positions = positions
        self.units = None if units is None else units.float()
        self.renorm = None if renorm is None or not bool(renorm.any()) else renorm.bool().reshape(-1, 1)
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        self.adds = bool(self.delta.any())
        self.rows = int(delta.shape[0])
        self.every_row = every_row
        if every_row and (self.rows != 1 or self.kind == "from"):
            raise ValueError("every_row takes one row, and positions from:K need each row's length")
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self.calls = 0
        self.decoded = 0  # positions seen after the prefill (from:K counts on from the prompt's end)
        self.view: torch.Tensor | None = None  # batch rows the next call's activations hold (`shared_trunk`)

    def _sel(self, t: torch.Tensor) -> torch.Tensor:
        """A per-row tensor restricted to `view` (None: every row)."""
        return t if self.view is None else t[self.view.to(t.device)]

    def _extra(self, b: int) -> tuple:
        """What besides the per-row tensors decides which of row b's positions are steered."""
        return (int(self.lengths[b]),) if self.kind == "from" else ()

    def signatures(self) -> list[tuple | None]:
        """Per row, what this layer does to it: None where it leaves the row as it is (no delta, no
        ablation, no rescaling). Rows with equal signatures are steered alike by this layer."""
        out: list[tuple | None] = []
        for b in range(self.rows):
            acts: list = []
            if bool(self.delta[b].any()):
                acts.append(("add", self.delta[b].numpy().tobytes()))
            if self.units is not None and bool(self.units[b].any()):
                acts.append(("ablate", self.units[b].numpy().tobytes()))
            if self.renorm is not None and bool(self.renorm[b]):
                acts.append(("renorm",))
            out.append((self.positions, *acts, *self._extra(b)) if acts else None)
        return out

    def _state(self) -> dict[str, torch.Tensor]:
        s = {"delta": self.delta}
        if self.units is not None:
            s["units"] = self.units
        if self.renorm is not None:
            s["renorm"] = self.renorm
        return s

    def _on(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        key = (name, like.device, dtype)
        if key not in self._cache:
            self._cache[key] = self._state()[name].to(device=like.device, dtype=dtype)[:, None, :]
        return self._sel(self._cache[key])

    def on(self, like: torch.Tensor) -> torch.Tensor:
        """The [B, 1, H] additive delta on `like`'s device and dtype."""
        return self._on("delta", like)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (indices into the current batch, in that order).

        The decode loop drops finished rows from the batch; every per-row state follows.
        """
        if self.every_row:  # one row for all: nothing to drop
            return
        cpu = rows.cpu()
        self.delta = self.delta[cpu]
        self.units = None if self.units is None else self.units[cpu]
        self.renorm = None if self.renorm is None else self.renorm[cpu]
        self.lengths = None if self.lengths is None else self.lengths[cpu]
        self.rows = int(self.delta.shape[0])
        self._cache = {k: v[rows.to(v.device)] for k, v in self._cache.items()}

    def steered(self, h: torch.Tensor) -> torch.Tensor:
        """Every position of `h` [B, T, H] steered by its row's mode (positions are `mask`'s job)."""
        out = h
        if self.units is not None:  # projection and norms in float32: bf16 sums lose the small part
            u = self._on("units", h, torch.float32)
            hf = h.float()
            out = (hf - (hf * u).sum(-1, keepdim=True) * u).to(h.dtype)
        if self.adds:
            out = out + self.on(h)
        if self.renorm is not None:
            r = self._on("renorm", h, torch.bool)
            of = out.float()
            scale = h.float().norm(dim=-1, keepdim=True) / of.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            out = torch.where(r, (of * scale).to(h.dtype), out)
        return out

    def mask(self, h: torch.Tensor) -> torch.Tensor | None:
        """[B, T] bool of the positions steered in this call; None = all of them.

        Call 1 is the prefill (its last column is each prompt's last token, also when a shared
        prefix cache makes it one column wide); every later call holds generated positions.
        """
        n = h.shape[1]
        prefill = self.calls == 1
        if self.kind == "all":
            return None
        if self.kind == "prompt":
            return None if prefill else torch.zeros(h.shape[:2], dtype=torch.bool)
        if self.kind == "generated":
            if prefill and n > 1:  # the prompt's own positions stay as the unsteered model computed them
                m = torch.zeros(h.shape[:2], dtype=torch.bool)
                m[:, -1] = True
                return m
            return None
        cols = torch.arange(n)[None, :]
        lengths = self._sel(self.lengths)[:, None]
        index = lengths - n + cols if prefill else lengths + self.decoded + cols  # token index in the row
        if not prefill:
            self.decoded += n
        return index >= self.k

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        rows = self.rows if self.view is None else len(self.view)
        if h.shape[0] != rows and not self.every_row:
            raise RuntimeError(f"steering hook got a batch of {h.shape[0]} rows but was built for {rows}")
        m = self.mask(h)
        if m is None:
            return self.steered(h)
        if not bool(m.any()):
            return h
        return torch.where(m.to(h.device)[:, :, None], self.steered(h), h)


def _on_hidden(output, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A decoder layer's output with its hidden states replaced by `fn(hidden states)`."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):  # older layers return (hidden, attn, ...): keep the type
        return (fn(output[0]), *output[1:])
    if hasattr(output, "last_hidden_state"):  # ModelOutput-like
        output.last_hidden_state = fn(output.last_hidden_state)
        return output
    raise TypeError(f"unexpected decoder layer output type {type(output).__name__}")


def _steer_hook(rd: RowDelta):
    def hook(module: nn.Module, args: tuple, output):  # noqa: ARG001
        return _on_hidden(output, rd.apply)

    return hook


def row_deltas(
    rows: Sequence[tuple], positions: str = "all", lengths: Sequence[int] | None = None, *, every_row: bool = False
) -> dict[int, RowDelta]:
    """Group batch rows by layer: row b = (layer, alpha, vector[, mode]), or a list of such parts on
    several layers -> {layer: RowDelta([B, H])}.

    Rows on other layers get zero deltas and directions for that layer, so they pass through
    unchanged (h - (h.0)0 + 0 == h exactly). Rows with alpha 0 are unsteered in every mode.

    Args:
        rows: per batch row (layer, alpha, vector) or (layer, alpha, vector, mode); see `MODES`.
        positions: see `parse_positions`.
        lengths: per-row prompt lengths (for positions from:K).
        every_row: `rows` is one row, applied to every row of whatever batch comes (see `RowDelta`).
    """
    every = [(b, part) for b, row in enumerate(rows) for part in row_parts(row)]
    if not every:
        return {}
    width = int(every[0][1][2].numel())
    n = len(rows)
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for b, part in every:
        layer, alpha, vec, mode = part[0], float(part[1]), part[2], row_mode(part)
        if mode not in MODES:
            raise ValueError(f"steering mode {mode!r}: use one of {', '.join(MODES)}")
        if alpha == 0:
            continue
        p = parts.setdefault(layer, {})
        v = vec.detach().float().cpu().reshape(-1)
        if mode in ("add", "ablate_add", "norm_preserving"):
            p.setdefault("delta", torch.zeros(n, width))[b] = alpha * v
        if mode in ("ablate", "ablate_add"):
            p.setdefault("units", torch.zeros(n, width))[b] = v / v.norm().clamp_min(1e-30)
        if mode == "norm_preserving":
            p.setdefault("renorm", torch.zeros(n, dtype=torch.bool))[b] = True
    return {
        layer: RowDelta(
            p.get("delta", torch.zeros(n, width)), positions, p.get("units"), p.get("renorm"), lengths, every_row
        )
        for layer, p in parts.items()
    }


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
