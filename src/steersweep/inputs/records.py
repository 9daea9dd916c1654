"""Finding and reading dataset files: a shipped name or a path resolved, JSONL / JSON / text decoded
(BOM, UTF-16), each record checked and given an id, its format detected."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steersweep.core.errors import DatasetError
from steersweep.core.paths import PACKAGE_DIR

log = logging.getLogger(__name__)
SUFFIXES = (".jsonl", ".json", ".txt")
SHIPPED = PACKAGE_DIR / "datasets"


def resolve(name_or_path: str, suffix: str = ".jsonl") -> Path:
    """A path to a file, or a shipped dataset name (e.g. `sentiment_pairs`): `suffix` is tried
    first, then .jsonl, .json and .txt."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    for s in dict.fromkeys((suffix, *SUFFIXES, "")):
        shipped = SHIPPED / (name_or_path + s)
        if shipped.is_file():
            return shipped
    names = sorted({f.stem for s in SUFFIXES for f in SHIPPED.glob("*" + s)})
    raise DatasetError(f"dataset {name_or_path!r} not found: give a file path or one of {', '.join(names)}")


CAA_KEYS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
KEYS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt",),
    "caa_open": ("question",),
    "caa_ab": CAA_KEYS,
    "text": (),
    "pairs": ("positive", "negative"),
    "continuation": ("prefix", "positive", "negative"),
    "ab": ("question", "A", "B", "positive"),
}
LABELS = {
    "prompts": "prompt items",
    "caa_open": "CAA open-ended items",
    "caa_ab": "CAA A/B items",
    "pairs": "contrastive pairs",
    "continuation": "continuation behaviour items",
    "ab": "A/B behaviour items",
}
NOTES = {
    "prompts": " ('id' optional; CAA files have 'question')",
    "pairs": " ('id' optional; CAA A/B files have 'question' and 'answer_matching_behavior')",
    "continuation": " ('id' optional)",
    "ab": " ('id' optional)",
}


@dataclass(frozen=True)
class Item:
    """One record of a file and where it is: `where` prefixes messages, `pos` names it in prose."""

    where: str  # "file:3" (line) or "file[2]" (array index)
    pos: str  # "line 3" or "item 2"
    value: Any
    in_array: bool


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff"))  # "Unicode text" from Windows tools
    try:
        return raw.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as e:
        name = "UTF-16" if utf16 else "UTF-8"
        raise DatasetError(f"{path}: not {name} text (byte {e.start}: {e.reason}): save it as UTF-8") from None


def _lines(text: str):
    """(line number, line) without line endings; only \\n ends a line (JSON strings may hold U+2028)."""
    for n, line in enumerate(text.split("\n"), 1):
        yield n, line.removesuffix("\r").lstrip("\ufeff")


def read_items(path: Path, fmt: str | None = None) -> tuple[list[Item], str | None]:
    """Every record of a file, and the format a wrapper object declares (None if none)."""
    text = _decode(path)
    if fmt == "text" or (fmt is None and path.suffix.lower() == ".txt"):
        return [Item(f"{path}:{n}", f"line {n}", line, False) for n, line in _lines(text) if line.strip()], "text"
    if not text.strip():
        return [], None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data" and (path.suffix.lower() == ".json" or text.lstrip().startswith("[")):
            raise DatasetError(
                f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}): fix it; "
                "expected a JSON array of objects, or one JSON object per line"
            ) from None
        return _jsonl(path, text), None  # several values (JSONL), or a broken line of one
    return _document(path, text, doc)


def _jsonl(path: Path, text: str) -> list[Item]:
    items = []
    for n, line in _lines(text):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path}:{n}: not valid JSON ({e.msg}: column {e.colno}): fix or remove that line"
            ) from None
        items.append(Item(f"{path}:{n}", f"line {n}", value, False))
    return items


def _document(path: Path, text: str, doc: Any) -> tuple[list[Item], str | None]:
    if isinstance(doc, list):
        return [Item(f"{path}[{i}]", f"item {i}", v, True) for i, v in enumerate(doc)], None
    if not isinstance(doc, dict):
        raise DatasetError(
            f"{path}: expected a JSON array of objects or one JSON object per line, got {type(doc).__name__}: "
            "put the items in a [...] array"
        )
    lists = [k for k, v in doc.items() if isinstance(v, list)]
    declared = doc.get("format") if isinstance(doc.get("format"), str) else None
    wrapper = [k for k in lists if set(doc) <= {k, "format"} or (doc[k] and all(isinstance(x, dict) for x in doc[k]))]
    if len(wrapper) > 1:
        raise DatasetError(
            f"{path}: holds several lists of items ({', '.join(wrapper)}): keep one, or give a JSON array of objects"
        )
    if wrapper:
        k = wrapper[0]
        return [Item(f"{path}:{k}[{i}]", f"{k}[{i}]", v, True) for i, v in enumerate(doc[k])], declared
    first = next(n for n, line in _lines(text) if line.strip())  # one object: a one-line JSONL file
    return [Item(f"{path}:{first}", f"line {first}", doc, False)], None


# ---------------------------------------------------------------------------------------------
# Checking records


def _obj(it: Item) -> dict:
    if not isinstance(it.value, dict):
        how = "make each element of the array a {...} object" if it.in_array else "write one {...} object per line"
        raise DatasetError(f"{it.where}: expected a JSON object, got {type(it.value).__name__}: {how}")
    return it.value


def _need(it: Item, obj: dict, fmt: str) -> None:
    keys = KEYS[fmt]
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DatasetError(
            f"{it.where}: missing key(s) {missing}; {LABELS[fmt]} need {list(keys)}{NOTES.get(fmt, '')}: "
            "add the missing key(s)"
        )


def _text(it: Item, obj: dict, key: str) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise DatasetError(f"{it.where}: {key!r} is {type(v).__name__} {v!r}, not text: write it as a JSON string")
    return v


def _given_id(it: Item, obj: dict) -> str | None:
    v = obj.get("id")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise DatasetError(f"{it.where}: 'id' is {type(v).__name__}: use a string or an integer, or drop it")
    return str(v)


def content_id(*parts: str) -> str:
    """A short, stable id from an item's text (12 hex digits of SHA-256)."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:12]


def _detect(obj: Any, kind: str, default: str) -> str:
    if not isinstance(obj, dict):
        return default
    if "answer_matching_behavior" in obj or "answer_not_matching_behavior" in obj:
        return "caa_ab"
    if kind == "prompts":
        return "caa_open" if "prompt" not in obj and "question" in obj else "prompts"
    if kind == "behavior":
        if "prefix" in obj:
            return "continuation"
        if "A" in obj or "B" in obj:
            return "ab"
    return default


def _records(name_or_path: str, kind: str, default: str, allowed, fmt: str | None) -> tuple[Path, list[Item], str]:
    """Read a file and settle its format: `fmt`, else the wrapper's, else detected from the first item.
    `kind`: prompts, pairs or behavior."""
    path = resolve(name_or_path)
    what_for = {"prompts": "prompts", "pairs": "contrastive pairs", "behavior": "behaviour items"}[kind]
    if fmt is not None and fmt not in allowed:
        raise DatasetError(f"{path}: format {fmt!r} cannot be read as {what_for}: use one of {', '.join(allowed)}")
    items, declared = read_items(path, fmt)
    if fmt is None and declared is not None and declared != "text":
        if declared not in allowed:
            raise DatasetError(
                f"{path}: declares format {declared!r}, which cannot be read as {what_for}: use one of {', '.join(allowed)}"
            )
        fmt = declared
    if not items:
        what = "one prompt per line" if (fmt or declared) == "text" else (
            f"a JSON object per line or in a JSON array, each with {list(KEYS[default])}")  # fmt: skip
        raise DatasetError(f"{path} has no rows: add at least one item ({what})")
    fmt = fmt or declared or _detect(items[0].value, kind, default)
    if fmt not in allowed:  # plain text read as pairs or behaviour items
        raise DatasetError(
            f"{path}: plain text gives prompts only (one per line): write {what_for} as JSONL or a JSON array "
            f"of objects with {list(KEYS[default])}"
        )
    return path, items, fmt


def _unique(path: Path, rows: list[dict], items: list[Item], given: list[bool]) -> list[dict]:
    """Given ids must be unique; a content id repeated by identical items gets -2, -3... (in file order)."""
    first: dict[str, Item] = {}
    for row, it, own in zip(rows, items, given, strict=True):
        if not own and row["id"] in first:
            base, k = row["id"], 2
            while f"{base}-{k}" in first:
                k += 1
            log.warning("%s: same content as %s; its derived id becomes %s-%d", it.where, first[base].pos, base, k)
            row["id"] = f"{base}-{k}"
        if row["id"] in first:
            raise DatasetError(
                f"{it.where}: id {row['id']!r} is already used at {first[row['id']].pos}; ids must be unique: "
                "give each item its own id (or drop the ids to derive them from the text)"
            )
        first[row["id"]] = it
    return rows
