"""Find a model's decoder layers and steer their outputs, row by row, inside a context manager.

One `generate` call can carry rows with different layers, alphas, vectors and modes: each row b is
steered at the output of its own layer only, by its own mode (`MODES`: add `alpha_b * v_b`, ablate
the direction, ablate then add, add at constant norm), on the positions `steering.positions` names.
The hook runs after accelerate's device hooks, so it sees the activation on the layer's execution
device; the per-row tensors are cast to that device and dtype once and cached, which is what fixes
the cuda:0 vs cuda:3 mismatch of field report 02 without giving up the KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import SteersweepError

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


class LayerLookupError(SteersweepError, ValueError):
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


def hook_name(layer: int | Sequence[int], label: str = "") -> str:
    """TransformerLens name of the residual stream after `layer` (what the steering hook edits); for a
    set of layers the names joined by "+", for the set `all` `blocks.*.hook_resid_post`."""
    if isinstance(layer, int):
        return f"blocks.{layer}.hook_resid_post"
    if label == "all":
        return "blocks.*.hook_resid_post"
    return "+".join(hook_name(x) for x in layer)


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
