"""Steering directions computed from contrast pairs: mean difference (CAA), PCA, logistic probe.

A vector for layer L lives in the residual stream *after* decoder layer L (TransformerLens
`blocks.L.hook_resid_post`, which is also `blocks.{L+1}.hook_resid_pre`). Vectors are kept in
float32 on the CPU; the steering hook casts them to each activation's device and dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from steersweep.core.errors import VectorError
from steersweep.hooks.trunk import record
from steersweep.inputs.encoding import Source, encode, model_inputs, pad_id_of, user_messages
from steersweep.vectors.vectorset import VectorSet

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
