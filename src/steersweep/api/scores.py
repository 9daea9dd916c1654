"""`ss.behavior_prob` (a loaded model's behaviour probability under steering, per item if asked) and
`ss.steerability` (how reliably each setting steers, from per-item scores)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steersweep.api.steer import _check_steering, _settings
from steersweep.inputs.encoding import pad_id_of

if TYPE_CHECKING:
    import pandas as pd

    from steersweep.api.steer import Vectors


def behavior_prob(
    model: Any,
    tokenizer: Any,
    items: str | os.PathLike | Sequence[Mapping[str, str]],
    layer: int,
    alpha: float,
    vectors: Vectors,
    fmt: str = "continuation",
    *,
    limit: int | None = None,
    chat_template: str = "auto",
    positions: str = "all",
    mode: str = "add",
    length_normalize: bool = False,
    batch_size: int = 32,
    layers_path: str | None = None,
    per_item: bool = False,
) -> float | pd.DataFrame:
    """The sweep's `behavior_prob` at one (layer, alpha): mean p(matching answer) over two-choice items.

    p(matching) = sigmoid(lp(matching) - lp(other)), each answer scored as the suffix of the
    jointly encoded context + answer under the steering (`metrics.behavior_probs`).

    Args:
        model, tokenizer: a loaded model (`load`, or any transformers causal LM).
        items: a dataset name or path (as `eval.behavior_dataset`), or items in the form of
            `fmt`: continuation {"prefix", "positive", "negative"}; ab {"question", "A", "B",
            "positive": "A" or "B"}.
        layer, alpha, vectors: the steering (alpha 0 = unsteered); vectors as in `steer`.
        fmt: continuation | ab (as `eval.behavior_format`).
        limit: score only the first `limit` items (as `eval.behavior_limit`).
        chat_template: auto | on | off; A/B items go in the chat template when it is used.
        positions: all | prompt (the context) | generated (the context's last token and the answer) | from:K.
        mode: add | ablate | ablate_add | norm_preserving (as `steering.mode`).
        length_normalize: compare mean (not total) log-probability per answer token.
        batch_size: sequences per forward pass.
        layers_path: dotted path to the decoder layers if auto-detection fails.

        per_item: return every item's scores instead of their mean.

    Returns:
        The mean over items, in [0, 1] (0.5 = no preference); with `per_item`, a DataFrame with one row
        per item: item_id, logp_match, logp_other, propensity (their difference), behavior_prob (the
        item table's columns, as a sweep writes them to items.parquet).
    """
    from steersweep.core.errors import ConfigError
    from steersweep.inputs.datasets import load_behavior_items
    from steersweep.inputs.encoding import use_chat_template
    from steersweep.scoring import behavior

    if fmt not in ("continuation", "ab"):
        raise ConfigError(f"fmt={fmt}: use continuation or ab")
    if isinstance(items, (str, os.PathLike)):
        rows = load_behavior_items(str(items), fmt)
    else:
        rows = [dict(x) for x in items]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ConfigError("no behaviour items to score")
    enc = behavior.encode_behavior_items(tokenizer, rows, fmt, use_chat_template(tokenizer, chat_template))
    _check_steering(positions, mode)
    setting = [(*r, mode) for r in _settings(model, 1, layer, alpha, vectors, layers_path)]
    (scores,) = behavior.behavior_item_scores(
        model, enc, setting, pad_id_of(tokenizer), batch_size, layers_path, positions, length_normalize
    )
    if not per_item:
        return behavior.behavior_summary(scores)[0]
    import pandas as pd

    return pd.DataFrame(
        [{"item_id": str(r["id"]), "logp_match": m, "logp_other": o, "propensity": m - o,
          "behavior_prob": behavior.sigmoid(m - o)} for r, (m, o) in zip(rows, scores, strict=True)]
    )  # fmt: skip


def steerability(items) -> pd.DataFrame:
    """The steerability table of a sweep (`steersweep.reliability`): per concept, method, mode, layer set
    and item set, the mean slope of item propensity against alpha with its 95% interval, the share of
    anti-steerable items, Spearman and the fit's residual.

    Args:
        items: a run folder, its items.parquet, or the item table as a DataFrame.
    """
    import pandas as pd

    from steersweep.core.errors import ConfigError
    from steersweep.runs.folder import RunFolder
    from steersweep.scoring.reliability import steerability as table

    if not isinstance(items, pd.DataFrame):
        path = Path(items)
        path = RunFolder(path).items_path if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(
                f"{path} not found: give a run folder whose sweep scored behavior_prob (it writes items.parquet)"
            )
        items = pd.read_parquet(path)
    return table(items)
