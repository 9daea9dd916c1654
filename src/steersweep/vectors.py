"""Steering vectors: compute them (contrastive activation addition), save, load, validate.

A vector for layer L lives in the residual stream *after* decoder layer L (TransformerLens
`blocks.L.hook_resid_post`, which is also `blocks.{L+1}.hook_resid_pre`). Vectors are kept in
float32 on the CPU; the steering hook casts them to each activation's device and dtype.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .encoding import Source, encode, model_inputs, pad_id_of, user_messages
from .errors import SteersweepError
from .fileio import atomic_write_bytes
from .hooks import record


class VectorError(SteersweepError, ValueError):
    """A vector file or vector set is unusable."""


@dataclass
class VectorSet:
    """One concept's steering vectors, one per layer."""

    vectors: dict[int, torch.Tensor]  # layer -> float32 [hidden]
    concept: str = "concept"
    meta: dict[str, str] = field(default_factory=dict)  # model, position, n_pairs, source...
    resid_norms: dict[int, float] = field(default_factory=dict)  # mean |h| at each layer

    @property
    def method(self) -> str:
        """How the vectors were found (`METHODS`), as recorded in their metadata; "file" if unknown."""
        m = self.meta.get("method", "file")
        return "mean_diff" if m == "caa_mean_difference" else m  # the name before methods existed

    def norm(self, layer: int) -> float:
        return float(self.vectors[layer].norm())

    def sha256(self, layer: int) -> str:
        return hashlib.sha256(self.vectors[layer].float().contiguous().numpy().tobytes()).hexdigest()

    def vector_id(self, layer: int) -> str:
        """Stable id: concept, layer and the first 12 hex digits of the tensor's hash."""
        return f"{self.concept}-L{layer}-{self.sha256(layer)[:12]}"

    def set_id(self, layers: Sequence[int], label: str) -> str:
        """Id of the vectors a cell steering several layers uses: `vector_id` for one layer, else the
        concept, the set's label and 12 hex digits of the hash of its layers' hashes."""
        if len(layers) == 1:
            return self.vector_id(layers[0])
        digest = hashlib.sha256("|".join(f"{k}:{self.sha256(k)}" for k in layers).encode()).hexdigest()
        return f"{self.concept}-L{label}-{digest[:12]}"

    def validate(self, hidden_size: int, num_layers: int, layers: Sequence[int] = ()) -> None:
        """Refuse wrong widths, NaN/Inf, out-of-range layers and missing requested layers."""
        for layer, v in self.vectors.items():
            if not 0 <= layer < num_layers:
                raise VectorError(
                    f"vector for layer {layer} but the model has {num_layers} layers (0..{num_layers - 1})"
                )
            if v.ndim != 1 or v.numel() != hidden_size:
                raise VectorError(
                    f"vector for layer {layer} has shape {tuple(v.shape)} but the model's hidden size "
                    f"is {hidden_size}: use vectors computed for this model"
                )
            if not torch.isfinite(v).all():
                raise VectorError(f"vector for layer {layer} contains NaN or Inf: recompute or fix the file")
        missing = sorted(set(layers) - set(self.vectors))
        if missing:
            raise VectorError(
                f"no vector for layer(s) {missing}; the file has layers {sorted(self.vectors)}: "
                "change steering.layers or use vectors.source=compute"
            )

    def normalized(self) -> VectorSet:
        vecs = {layer: v / v.norm().clamp_min(1e-12) for layer, v in self.vectors.items()}
        return VectorSet(
            vecs,
            self.concept,
            {**self.meta, "normalized": "true"},
            dict(self.resid_norms),
        )


# ---------------------------------------------------------------------------------------------
# Compute


def _batches(items: Sequence[str], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.inference_mode()
def mean_activation(
    model,
    tokenizer,
    texts: Sequence[Source],
    layers: Sequence[int],
    position: int = -1,
    batch_size: int = 16,
    layers_path: str | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Mean residual stream after each layer at token `position` over `texts` (left padded).

    Each text is raw (special tokens added) or a list of chat messages (the chat template, without
    a generation prompt), encoded by `encoding.encode`; position ids follow the padding mask.

    Returns:
        ({layer: mean vector float32 [H]}, {layer: mean norm of those activations}).
    """
    sums = {layer: None for layer in layers}
    norm_sums = {layer: 0.0 for layer in layers}
    n = 0
    device = model.get_input_embeddings().weight.device
    pad = pad_id_of(tokenizer)
    for chunk in _batches(list(texts), batch_size):
        ids = [encode(tokenizer, t, add_generation_prompt=False).ids for t in chunk]
        enc = model_inputs(ids, pad)
        lengths = enc["attention_mask"].sum(1)
        if position < 0 and (lengths < -position).any() or position >= 0 and (lengths <= position).any():
            raise VectorError(f"an example is shorter than token position {position}: change vectors.position")
        if position >= 0:  # count from the first real token of each left-padded row
            idx = enc["input_ids"].shape[1] - lengths + position
        else:
            idx = torch.full_like(lengths, enc["input_ids"].shape[1] + position)
        with record(model, layers, layers_path) as store:
            model(**{k: v.to(device) for k, v in enc.items()}, logits_to_keep=1)  # no full-vocab logits
        rows = torch.arange(len(chunk))
        for layer in layers:
            h = store[layer][0].float().cpu()[rows, idx]  # [b, H]
            sums[layer] = h.sum(0) if sums[layer] is None else sums[layer] + h.sum(0)
            norm_sums[layer] += float(h.norm(dim=-1).sum())
        n += len(chunk)
    return {layer: s / n for layer, s in sums.items()}, {layer: norm_sums[layer] / n for layer in layers}


READ_AT = ("last", "answer", "answer_mean")
PLACEHOLDER = "\x00steersweep-content\x00"


def example_ids(tokenizer, pair: dict, side: str, chat_template: bool, read_at: str, position: int = -1):
    """Token ids of one side of a contrastive pair and the indices whose activations are read.

    - CAA A/B pairs (`format: ab`): the question is the user turn (chat template) or raw text
      followed by "Answer: ", and the answer "(A" / "(B" continues it, encoded jointly
      (`encoding.encode`). `last` and `answer` read the answer's last token (the letter), as the
      paper does; `answer_mean` averages over the answer's tokens.
    - Text pairs: the whole text. `last` reads token `position` (-1: the last); with the chat
      template `answer` reads the text's own last token, not the template's closing tokens, and
      `answer_mean` averages over the text's tokens.
    The chat template is applied once, by the template itself (its BOS, never a second one).
    """
    if pair.get("format") == "ab":
        src = user_messages(pair["question"]) if chat_template else pair["question"] + "\n\nAnswer: "
        e = encode(tokenizer, src, pair[side])
        ids = list(e.ids)
        return ids, list(range(e.n_context, len(ids))) if read_at == "answer_mean" else [len(ids) - 1]
    text = pair[side]
    if not chat_template:
        ids = list(encode(tokenizer, text).ids)
        start = len(encode(tokenizer, "").ids)  # BOS and other tokens the tokenizer adds before text
        end = len(ids)
    else:  # locate the text inside the rendered template
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": PLACEHOLDER}], tokenize=False)
        before, after = rendered.split(PLACEHOLDER)
        head = tokenizer(before, add_special_tokens=False)["input_ids"]
        upto = tokenizer(before + text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(before + text + after, add_special_tokens=False)["input_ids"]
        start, end = len(head), len(upto)
    if read_at == "answer_mean":
        return ids, list(range(start, end))
    if read_at == "answer":
        return ids, [end - 1]
    idx = len(ids) + position if position < 0 else position
    if not 0 <= idx < len(ids):
        raise VectorError(f"an example is shorter than token position {position}: change vectors.position")
    return ids, [idx]


def _example_rows(
    model, examples: Sequence[tuple[list[int], list[int]]], layers: Sequence[int], batch_size: int,
    layers_path: str | None,
) -> Iterator[dict[int, torch.Tensor]]:  # fmt: skip
    """Per chunk of examples: {layer: [b, H] float32}, each example's activation averaged over its
    own token indices (left padding and mask-following positions, as `encoding.model_inputs`)."""
    device = model.get_input_embeddings().weight.device
    pad = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        enc = model_inputs([ids for ids, _ in chunk], pad)
        width = enc["input_ids"].shape[1]
        with record(model, layers, layers_path) as store:
            model(**{k: v.to(device) for k, v in enc.items()}, logits_to_keep=1)
        out = {}
        for layer in layers:
            h = store[layer][0].float().cpu()
            out[layer] = torch.stack(
                [h[b, [width - len(ids) + i for i in idx]].mean(0) for b, (ids, idx) in enumerate(chunk)]
            )
        yield out


@torch.inference_mode()
def mean_activation_at(
    model, examples: Sequence[tuple[list[int], list[int]]], layers: Sequence[int], batch_size: int = 16,
    layers_path: str | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, float]]:  # fmt: skip
    """Mean over examples of the residual stream after each layer, each example averaged over its
    own token indices (left padding and mask-following positions, as `encoding.model_inputs`)."""
    return _means(_example_rows(model, examples, layers, batch_size, layers_path), layers, len(examples))


def _means(chunks: Iterable[dict[int, torch.Tensor]], layers: Sequence[int], n: int):
    """(mean activation, mean norm) per layer from per-chunk activations, summed chunk by chunk: the
    same arithmetic whether the chunks stream past (mean_diff alone) or were kept (other methods)."""
    sums: dict[int, torch.Tensor] = {}
    norm_sums = {layer: 0.0 for layer in layers}
    for rows_of in chunks:
        for layer, rows in rows_of.items():
            sums[layer] = rows.sum(0) if layer not in sums else sums[layer] + rows.sum(0)
            norm_sums[layer] += float(rows.norm(dim=-1).sum())
    return {layer: sums[layer] / n for layer in layers}, {layer: norm_sums[layer] / n for layer in layers}


@torch.inference_mode()
def activations_at(
    model, examples: Sequence[tuple[list[int], list[int]]], layers: Sequence[int], batch_size: int = 16,
    layers_path: str | None = None,
) -> dict[int, torch.Tensor]:  # fmt: skip
    """Every example's activation after each layer: {layer: [N, H] float32} (see `mean_activation_at`)."""
    chunks = list(_example_rows(model, examples, layers, batch_size, layers_path))
    return {layer: torch.cat([c[layer] for c in chunks]) for layer in layers}


# How a direction is found from the paired activations P, N ([n_pairs, H]; row i is pair i):
#   mean_diff   mean(P) - mean(N) (CAA)
#   pca_diff    first principal component of the differences P - N (centred, as PCA is)
#   pca_center  first principal component of [P - C; N - C], C = (P + N) / 2 the pairs' centres
#               (repeng's definition: each example relative to its own pair's centre)
#   logistic    normalised weight of an L2-regularised logistic-regression probe (positive = 1)
# pca_* and logistic give a unit direction, oriented to agree with the mean difference and scaled
# to its norm, so the same alpha means the same push size whatever the method.
METHODS = ("mean_diff", "pca_diff", "pca_center", "logistic")


def first_component(x: torch.Tensor) -> torch.Tensor:
    """Unit first principal component of the rows of `x` (centred), float64."""
    x = x.double()
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    return vh[0]


def logistic_direction(pos: torch.Tensor, neg: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """Unit weight vector of a logistic-regression probe (positive = 1, negative = 0), float64.

    Minimises 0.5 |w|^2 + c * sum_i logloss(y_i, w.x_i + b) (the intercept is not penalised; the
    objective of scikit-learn's LogisticRegression(C=c)), full-batch L-BFGS from zero: convex,
    deterministic. Solved on the activations centred and divided by their mean norm s, with c s^2
    in place of c: the same minimiser up to scale, better conditioned.
    """
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    x = x - x.mean(0)
    s = float(x.norm(dim=1).mean()) or 1.0
    x = x / s
    cs = c * s * s
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        z = x @ w + b
        loss = 0.5 * (w * w).sum() + cs * torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum")
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = w.detach()
    if not torch.isfinite(w).all() or float(w.norm()) == 0:
        raise VectorError("the logistic probe found no direction (identical positive and negative activations?)")
    return w / w.norm()


def direction(method: str, pos: torch.Tensor, neg: torch.Tensor, logistic_c: float = 1.0) -> torch.Tensor:
    """One layer's steering vector from paired activations pos[i], neg[i] ([n_pairs, H]); see `METHODS`."""
    md = pos.double().mean(0) - neg.double().mean(0)
    if method == "mean_diff":
        return md.float()
    if method == "pca_diff":
        u = first_component(pos - neg)
    elif method == "pca_center":
        centre = (pos.double() + neg.double()) / 2
        u = first_component(torch.cat([pos - centre, neg - centre]))
    elif method == "logistic":
        u = logistic_direction(pos, neg, logistic_c)
    else:
        raise VectorError(f"vectors.method={method}: use one of {', '.join(METHODS)}")
    if float(u @ md) < 0:
        u = -u
    return (u * md.norm()).float()


def compute_caa(
    model,
    tokenizer,
    pairs: Sequence[dict],
    layers: Sequence[int],
    concept: str,
    position: int = -1,
    batch_size: int = 16,
    chat_template: bool = False,
    layers_path: str | None = None,
    model_name: str = "",
    read_at: str = "last",
    method: str = "mean_diff",
    logistic_c: float = 1.0,
) -> VectorSet:
    """Steering vectors from contrastive pairs: mean(positive) - mean(negative) per layer (CAA), or
    another direction of the same paired activations (`method`, see `METHODS`).

    Args:
        pairs: the internal pair form (`data.load_pairs`): text pairs {"positive", "negative"} or
            CAA A/B pairs {"format": "ab", "question", "positive": "(A", "negative": "(B"}.
        position: token index read in text pairs with `read_at="last"` (-1 = last token).
        chat_template: wrap each example in the tokenizer's chat template (applied once).
        read_at: last | answer (the answer letter of A/B pairs) | answer_mean (see `example_ids`).
        method: mean_diff | pca_diff | pca_center | logistic.
        logistic_c: inverse L2 strength of the logistic probe (scikit-learn's C).
    """
    return compute_methods(
        model, tokenizer, pairs, layers, concept, [method], position, batch_size, chat_template, layers_path,
        model_name, read_at, logistic_c,
    )[method]  # fmt: skip


def compute_methods(
    model,
    tokenizer,
    pairs: Sequence[dict],
    layers: Sequence[int],
    concept: str,
    methods: Sequence[str] = ("mean_diff",),
    position: int = -1,
    batch_size: int = 16,
    chat_template: bool = False,
    layers_path: str | None = None,
    model_name: str = "",
    read_at: str = "last",
    logistic_c: float = 1.0,
) -> dict[str, VectorSet]:
    """`compute_caa` for several methods from one pass over the pairs: {method: VectorSet}.

    The activations are read once; every method's vectors come from the same numbers, and each
    method's vectors equal those of a run with that method alone.
    """
    if not pairs:
        raise VectorError("the contrastive dataset is empty: give at least one positive/negative pair")
    if read_at not in READ_AT:
        raise VectorError(f"vectors.read_at={read_at}: use one of {', '.join(READ_AT)}")
    for method in methods:
        if method not in METHODS:
            raise VectorError(f"vectors.method={method}: use one of {', '.join(METHODS)}")
        if method != "mean_diff" and len(pairs) < 2:
            raise VectorError(
                f"vectors.method={method} needs at least 2 pairs (got {len(pairs)}): add pairs or use mean_diff"
            )
    keep = any(m != "mean_diff" for m in methods)  # mean_diff alone streams: no [n, H] matrix kept
    chunks, mean, norm = {}, {}, {}
    with torch.inference_mode():  # reading only; the logistic probe below fits with autograd
        for side in ("positive", "negative"):
            examples = [example_ids(tokenizer, p, side, chat_template, read_at, position) for p in pairs]
            rows = _example_rows(model, examples, layers, batch_size, layers_path)
            chunks[side] = list(rows) if keep else rows
            mean[side], norm[side] = _means(chunks[side], layers, len(examples))
        if keep:
            pos, neg = ({layer: torch.cat([c[layer] for c in chunks[s]]) for layer in layers}
                        for s in ("positive", "negative"))  # fmt: skip
    kinds = sorted({p.get("format", "text") for p in pairs})
    norms = {layer: (norm["positive"][layer] + norm["negative"][layer]) / 2 for layer in layers}
    out = {}
    for method in methods:
        if method == "mean_diff":
            vecs = {layer: (mean["positive"][layer] - mean["negative"][layer]).contiguous() for layer in layers}
        else:
            vecs = {layer: direction(method, pos[layer], neg[layer], logistic_c).contiguous() for layer in layers}
        meta = {
            "model": model_name,
            "concept": concept,
            "method": method,
            "read_at": read_at,
            "position": str(position),
            "pairs_format": ",".join(kinds),
            "n_pairs": str(len(pairs)),
            "chat_template": str(bool(chat_template)).lower(),
        }
        if method == "logistic":
            meta["logistic_c"] = repr(float(logistic_c))
        out[method] = VectorSet(vecs, concept, meta, dict(norms))
    return out


# ---------------------------------------------------------------------------------------------
# Save / load


def save(vs: VectorSet, path: str | Path) -> Path:
    """Write a VectorSet as safetensors (`layer.{L}` tensors; metadata as JSON strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(vs.meta)
    meta["concept"] = vs.concept
    meta["format"] = "steersweep.vectors.v1"
    meta["norms"] = json.dumps({str(k): vs.norm(k) for k in vs.vectors})
    meta["resid_norms"] = json.dumps({str(k): v for k, v in vs.resid_norms.items()})
    tensors = {f"layer.{k}": v.float().contiguous() for k, v in vs.vectors.items()}
    # unique tmp name: array tasks starting together may save the same file at once
    atomic_write_bytes(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


GGUF_ARCH = "controlvector"  # llama.cpp control vectors (see exchange.py)


def read_control_vector(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a control-vector GGUF: ({"direction.k": tensor}, metadata)."""
    import numpy as np
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except Exception as e:
        raise VectorError(f"cannot read GGUF file {path}: {e}") from None
    meta: dict[str, str] = {}
    for name, fld in r.fields.items():
        if name.startswith((GGUF_ARCH + ".", "steersweep.")) or name == "general.architecture":
            value = fld.parts[fld.data[0]]
            meta[name] = bytes(value).decode() if value.dtype == np.uint8 else str(value.tolist()[0])
    if meta.get("general.architecture") != GGUF_ARCH:
        raise VectorError(f"{path} is not a control-vector GGUF (architecture {meta.get('general.architecture')!r})")
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1)) for t in r.tensors}
    out = {"model": meta.get(f"{GGUF_ARCH}.model_hint", ""), "format": "gguf.controlvector"}
    # steersweep.exchange's own keys: the concept, residual norms and metadata survive the round trip
    # (so vector_id and alpha_rel do not change); llama.cpp ignores them
    try:
        out.update(json.loads(meta.get("steersweep.meta", "{}")))
    except ValueError:
        raise VectorError(f"{path}: its steersweep.meta is not JSON; re-export the file") from None
    out.update({k: meta[f"steersweep.{k}"] for k in ("concept", "resid_norms") if f"steersweep.{k}" in meta})
    return tensors, out


_TL_KEY = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


def _layer_of(key: str) -> int:
    """Map a tensor name to the layer whose output it lives after."""
    m = _TL_KEY.match(key)
    if m:
        layer = int(m.group(1))
        # resid_pre of block L is the output of block L-1.
        return layer if m.group(2) == "post" else layer - 1
    for prefix in ("layer.", "direction."):  # ours; llama.cpp control vectors
        if key.startswith(prefix) and key[len(prefix) :].isdigit():
            return int(key[len(prefix) :])
    if key.isdigit():
        return int(key)
    raise VectorError(
        f"unrecognised vector key {key!r}: expected layer.N, blocks.N.hook_resid_post, "
        "blocks.N.hook_resid_pre, direction.N or N"
    )


def load(path: str | Path, concept: str | None = None) -> VectorSet:
    """Load vectors from .safetensors (ours or `direction.N`), .pt/.pth (weights_only) or .gguf."""
    path = Path(path)
    if not path.is_file():
        raise VectorError(f"vector file not found: {path} (set vectors.path to an existing file)")
    suffix = path.suffix.lower()
    meta: dict[str, str] = {}
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated or not a safetensors file
            raise VectorError(f"cannot read safetensors file {path}: {e}; re-save or re-download it") from None
    elif suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickles with code are refused by weights_only=True
            # our own reason, never PyTorch's advice to turn weights_only off (that runs the pickle)
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
            if found or "Weights only load failed" in str(e):
                why = "it pickles Python objects, not only tensors" + (f": {found[1]}" if found else "")
            else:
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VectorError(
                f"refused to load {path} with weights_only=True ({why}); save plain tensors in a dict "
                "or use safetensors"
            ) from None
        if not isinstance(obj, dict):
            raise VectorError(f"{path} holds a {type(obj).__name__}; expected a dict of hook name -> tensor")
        raw = {str(k): v for k, v in obj.items()}
    elif suffix == ".gguf":
        raw, meta = read_control_vector(path)
    else:
        raise VectorError(f"unsupported vector file type {suffix!r}: use .safetensors, .pt or .gguf")
    vecs: dict[int, torch.Tensor] = {}
    for key, t in raw.items():
        if not isinstance(t, torch.Tensor):
            raise VectorError(f"{path}: entry {key!r} is not a tensor")
        layer = _layer_of(key)
        if layer < 0:
            raise VectorError(f"{path}: {key} is the model input (before layer 0); it cannot be steered here")
        vecs[layer] = t.detach().float().reshape(-1) if t.ndim > 1 and t.shape[0] == 1 else t.detach().float()
    if not vecs:
        raise VectorError(f"{path} contains no vectors")
    resid = {int(k): float(v) for k, v in json.loads(meta.get("resid_norms", "{}")).items()}
    name = concept or meta.get("concept") or path.stem
    meta = {k: v for k, v in meta.items() if k not in ("norms", "resid_norms")}
    meta["source_file"] = str(path)
    return VectorSet(vecs, name, meta, resid)
