"""Shipped datasets (src/steersweep/datasets/) and user JSONL files, with line-numbered errors."""

from __future__ import annotations

import json
from pathlib import Path

SHIPPED = Path(__file__).parent / "datasets"


class DatasetError(ValueError):
    """A dataset file is missing or malformed."""


def resolve(name_or_path: str, suffix: str = ".jsonl") -> Path:
    """A shipped dataset name (e.g. `sentiment_pairs`) or a path to a file."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = SHIPPED / (name_or_path + suffix)
    if shipped.is_file():
        return shipped
    names = sorted(f.stem for f in SHIPPED.glob("*" + suffix))
    raise DatasetError(f"dataset {name_or_path!r} not found: give a file path or one of {', '.join(names)}")


def load_jsonl(name_or_path: str, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; every line must be a JSON object holding the `required` keys."""
    path = resolve(name_or_path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{i}: not valid JSON ({e.msg}): fix or remove that line") from None
            if not isinstance(obj, dict):
                raise DatasetError(
                    f"{path}:{i}: expected a JSON object, got {type(obj).__name__}: write one {{...}} object per line"
                )
            missing = [k for k in required if k not in obj]
            if missing:
                raise DatasetError(f"{path}:{i}: missing key(s) {missing}; each line needs {list(required)}")
            rows.append(obj)
    if not rows:
        raise DatasetError(f"{path} has no rows: add at least one JSON object per line, each with {list(required)}")
    return rows


def load_prompts(name_or_path: str, limit: int | None = None) -> list[dict]:
    """Prompts as [{"id": str, "prompt": str}]; ids must be unique."""
    rows = load_jsonl(name_or_path, ("id", "prompt"))[: limit if limit else None]
    ids = [str(r["id"]) for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DatasetError(f"prompt ids must be unique; repeated: {dup[:5]}: give each prompt its own id")
    return [{"id": str(r["id"]), "prompt": str(r["prompt"])} for r in rows]


def load_word_lists(name_or_path: str) -> dict[str, list[str]]:
    path = resolve(name_or_path, ".json")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(
            f'{path}: not valid JSON ({e.msg} at line {e.lineno}): fix it; expected {{"name": [words...]}}'
        ) from None
    if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
        raise DatasetError(f'{path}: expected {{"name": [words...]}}: make it one object of word lists')
    return {k: [w.lower() for w in v] for k, v in d.items()}
