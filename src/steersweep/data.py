"""Datasets: shipped ones (src/steersweep/datasets/) and user files, read into three internal forms.

Reading (`read_items`): a file is UTF-8 (with or without a BOM; UTF-16 with a BOM too) and holds
- JSONL: one JSON object per line (blank lines skipped);
- a JSON array of objects, or one object whose only list is the items (`{"format": ..., "data": [...]}`;
  a string `format` there declares the file's format);
- plain text (`.txt`, or `format="text"`): one prompt per non-blank line.
Errors are one line: the file and the item (`file:LINE` for JSONL and text, `file[INDEX]` for a
JSON array, 0-based), what is wrong, and what to do.

Formats of the items (detected from the first item's keys unless given: the `format` argument wins,
then a wrapper object's `format`):
- `prompts`       {"prompt", "id"?}                       ours
- `caa_open`      {"question"}                            CAA open-ended test sets
- `caa_ab`        {"question", "answer_matching_behavior", "answer_not_matching_behavior"}
                  CAA A/B sets: the question holds the options, marked "(A)" and "(B)" (after a
                  "Choices:" line or not, at a line start with or without leading spaces, or inline)
- `text`          plain text lines
- `pairs`         {"positive", "negative", "id"?}         ours, two whole texts
- `continuation`  {"prefix", "positive", "negative", "id"?}
- `ab`            {"question", "A", "B", "positive": "A"|"B", "id"?}
Detection: `answer_matching_behavior` or `answer_not_matching_behavior` -> caa_ab; for prompts
`prompt` -> prompts, else `question` -> caa_open; for behaviour items `prefix` -> continuation,
`A` or `B` -> ab; otherwise the caller's default (prompts, pairs, the scoring form).

Internal forms (every row has a string `id`: the file's own, else a short hash of the content,
stable across runs; ids are unique per file):
- prompts (`load_prompts`): {"id", "prompt"}. CAA files give the question text verbatim (A/B
  questions with their options).
- contrastive pairs for vectors (`load_pairs`):
    ours:  {"id", "format": "text", "positive": text, "negative": text}: read each whole text.
    CAA:   {"id", "format": "ab", "question": the CAA question verbatim (options included),
            "positive": "(A", "negative": "(B"}: the answers are *continuations* of the question
           (the assistant's reply, as in the paper: question as the user turn, then "(A"); the
           activation to read is at the answer letter, the last token of "(A" / "(B".
           Also "positive_letter" / "negative_letter": "A" / "B".
- behaviour items (`load_behavior_items(name, form)`, form = eval.behavior_format):
    continuation: {"id", "prefix", "positive", "negative"}
    ab:           {"id", "question", "A", "B", "positive": "A"|"B"}; from a CAA file the question
                  is the text before the options ("Choices:" dropped), A/B the option texts, and
                  "caa_question" keeps the original question so a scorer can present it verbatim.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SteersweepError

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "datasets"
SUFFIXES = (".jsonl", ".json", ".txt")

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
PROMPT_FORMATS = ("prompts", "caa_open", "caa_ab", "text")
PAIR_FORMATS = ("pairs", "caa_ab")
BEHAVIOR_FORMATS = {"continuation": ("continuation",), "ab": ("ab", "caa_ab")}


def set_name(name_or_path: str) -> str:
    """A behaviour item set's name in the item table: its file's stem (`refusal/test_dataset_ab.json` ->
    test_dataset_ab, `sentiment_ab` -> sentiment_ab)."""
    return Path(str(name_or_path)).name.split(".")[0]


def items_form(items: list[dict]) -> str:
    """How loaded behaviour items are scored: continuation ({prefix, ...}) or ab ({question, A, B, ...})."""
    return "continuation" if items and "prefix" in items[0] else "ab"


def behavior_form(fmt: str) -> str:
    """How items of a file format are scored: continuation or ab."""
    return next(form for form, fmts in BEHAVIOR_FORMATS.items() if fmt in fmts)


class DatasetError(SteersweepError, ValueError):
    """A dataset file is missing or malformed."""


@dataclass(frozen=True)
class Item:
    """One record of a file and where it is: `where` prefixes messages, `pos` names it in prose."""

    where: str  # "file:3" (line) or "file[2]" (array index)
    pos: str  # "line 3" or "item 2"
    value: Any
    in_array: bool


# ---------------------------------------------------------------------------------------------
# Finding and reading files


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


# Words that name a file's role, not its concept: the CAA repository keeps each behaviour's files in a
# folder named after it (refusal/generate_dataset.json, refusal/test_dataset_ab.json)
ROLE_SUFFIXES = ("_pairs", "_dataset", "_ab", "_open_ended")
ROLE_NAMES = {"", "generate", "test", "train", "dataset", "data", "pairs"}


def concept_of(source: str) -> str:
    """The concept a pairs dataset is about, from its name (`vectors.concept`'s default, so the run
    folder, vector ids and rows name what was steered): `sentiment_pairs` -> sentiment,
    `.../refusal/generate_dataset.json` -> refusal (a role-only file name gives its folder's name),
    `my/formal.jsonl` -> formal. Characters a folder name should not hold become `_`."""
    p = Path(str(source))
    name = p.stem
    while any(name.endswith(s) for s in ROLE_SUFFIXES):
        name = name.removesuffix(next(s for s in ROLE_SUFFIXES if name.endswith(s)))
    if name in ROLE_NAMES:
        name = p.parent.name or p.stem
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name).lstrip(".+-") or "concept"


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


# ---------------------------------------------------------------------------------------------
# CAA A/B questions

_LINE_MARK = re.compile(r"(?m)^[ \t]*\(([AB])\)")
_ANY_MARK = re.compile(r"\(([AB])\)")
_LETTER = re.compile(r"^\s*\(?\s*([AB])\s*\)?\s*$")


def split_ab(question: str) -> tuple[str, str, str] | None:
    """(stem, option A, option B) of a CAA question, or None without both markers.

    The options are the last "(B)" marker and the last "(A)" before it, at line starts (leading
    spaces allowed) if the question has them there, else anywhere. A runs up to the (B) marker, B up
    to a blank line or the end; the stem is the text before (A) without a trailing "Choices:".
    """
    for mark in (_LINE_MARK, _ANY_MARK):
        bs = [m for m in mark.finditer(question) if m.group(1) == "B"]
        for b in reversed(bs):
            a = [m for m in mark.finditer(question, 0, b.start()) if m.group(1) == "A"]
            if a:
                a = a[-1]
                stem = re.sub(r"(?is)\s*choices\s*:?\s*$", "", question[: a.start()]).strip()
                opt_a = question[a.end() : b.start()].strip()
                opt_b = re.split(r"\n[ \t]*\n", question[b.end() :], maxsplit=1)[0].strip()
                return stem, opt_a, opt_b
    return None


def _letter(it: Item, obj: dict, key: str) -> str:
    v = obj[key]
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    m = _LETTER.match(v) if isinstance(v, str) else None
    if not m:
        raise DatasetError(f"{it.where}: {key!r} is {v!r}: CAA A/B items answer '(A)' or '(B)'")
    return m.group(1)


def _caa_ab(it: Item, obj: dict) -> tuple[str, str, str, str, str, str]:
    """(question, stem, A, B, matching letter, other letter) of a CAA A/B item, checked."""
    _need(it, obj, "caa_ab")
    q = _text(it, obj, "question")
    pos, neg = _letter(it, obj, "answer_matching_behavior"), _letter(it, obj, "answer_not_matching_behavior")
    if pos == neg:
        raise DatasetError(
            f"{it.where}: answer_matching_behavior and answer_not_matching_behavior are both ({pos}): "
            "one must be (A), the other (B)"
        )
    parts = split_ab(q)
    if parts is None or not all(parts[1:]):
        raise DatasetError(
            f"{it.where}: cannot find the options '(A) ...' and '(B) ...' in 'question': "
            "list both options in the question, each after its (A) or (B) marker"
        )
    return q, *parts, pos, neg


# ---------------------------------------------------------------------------------------------
# The three loaders


def load_prompts(name_or_path: str, limit: int | None = None, format: str | None = None) -> list[dict]:
    """Prompts as [{"id": str, "prompt": str}]; ids unique (see the module docstring for formats)."""
    path, items, fmt = _records(name_or_path, "prompts", "prompts", PROMPT_FORMATS, format)
    rows, given = [], []
    for it in items:
        if fmt == "text":
            rows.append({"id": content_id(it.value), "prompt": it.value})
            given.append(False)
            continue
        obj = _obj(it)
        fmt_ = "prompts" if fmt == "prompts" else "caa_open"  # an A/B question is a prompt as it stands
        _need(it, obj, fmt_)
        text = _text(it, obj, KEYS[fmt_][0])
        own = _given_id(it, obj)
        rows.append({"id": own or content_id(text), "prompt": text})
        given.append(own is not None)
    _unique(path, rows, items, given)
    return rows[: limit if limit else None]


def load_pairs(name_or_path: str, format: str | None = None) -> list[dict]:
    """Contrastive pairs for vectors (see the module docstring: format "text" or "ab")."""
    path, items, fmt = _records(name_or_path, "pairs", "pairs", PAIR_FORMATS, format)
    rows, given = [], []
    for it in items:
        obj = _obj(it)
        own = _given_id(it, obj)
        if fmt == "caa_ab":
            q, _stem, _a, _b, pos, neg = _caa_ab(it, obj)
            row = {"id": own or content_id(q, pos, neg), "format": "ab", "question": q}
            row |= {"positive": f"({pos}", "negative": f"({neg}", "positive_letter": pos, "negative_letter": neg}
        else:
            _need(it, obj, "pairs")
            p, n = _text(it, obj, "positive"), _text(it, obj, "negative")
            row = {"id": own or content_id(p, n), "format": "text", "positive": p, "negative": n}
        rows.append(row)
        given.append(own is not None)
    return _unique(path, rows, items, given)


def load_behavior_items(name_or_path: str, form: str = "continuation", format: str | None = None) -> list[dict]:
    """Two-choice items scored as `form` (eval.behavior_format: continuation or ab; auto: as the file holds them,
    for eval.behavior_sets, whose files may hold either)."""
    if form not in (*BEHAVIOR_FORMATS, "auto"):
        raise DatasetError(f"behaviour items are scored as continuation or ab, not {form!r}")
    allowed = BEHAVIOR_FORMATS["continuation"] + BEHAVIOR_FORMATS["ab"]
    path, items, fmt = _records(name_or_path, "behavior", "continuation" if form == "auto" else form, allowed, format)
    if form == "auto":
        form = behavior_form(fmt)
    if fmt not in BEHAVIOR_FORMATS[form]:
        want = "ab" if form == "continuation" else "continuation"
        raise DatasetError(
            f"{path}: holds {LABELS[fmt]} but eval.behavior_format={form}: set eval.behavior_format={want}"
        )
    rows, given = [], []
    for it in items:
        obj = _obj(it)
        own = _given_id(it, obj)
        if fmt == "caa_ab":
            q, stem, a, b, pos, neg = _caa_ab(it, obj)
            row = {"id": own or content_id(q, pos, neg), "question": stem, "A": a, "B": b, "positive": pos}
            row["caa_question"] = q
        elif fmt == "ab":
            _need(it, obj, "ab")
            q, a, b = _text(it, obj, "question"), _text(it, obj, "A"), _text(it, obj, "B")
            m = _LETTER.match(obj["positive"]) if isinstance(obj["positive"], str) else None
            if not m:
                raise DatasetError(
                    f'{it.where}: \'positive\' is {obj["positive"]!r}: write "A" or "B" (the matching option)'
                )
            pos = m.group(1)
            row = {"id": own or content_id(q, a, b, pos), "question": q, "A": a, "B": b, "positive": pos}
        else:
            _need(it, obj, "continuation")
            pre, p, n = (_text(it, obj, k) for k in ("prefix", "positive", "negative"))
            row = {"id": own or content_id(pre, p, n), "prefix": pre, "positive": p, "negative": n}
        rows.append(row)
        given.append(own is not None)
    return _unique(path, rows, items, given)


def load_jsonl(name_or_path: str, required: tuple[str, ...] = ()) -> list[dict]:
    """The raw objects of a dataset file (JSONL or JSON, BOM or not), each holding the `required` keys."""
    path = resolve(name_or_path)
    items, _ = read_items(path)
    if not items:
        raise DatasetError(
            f"{path} has no rows: add at least one item (a JSON object per line or in a JSON array), "
            f"each with {list(required)}"
        )
    rows = []
    for it in items:
        obj = _obj(it)
        missing = [k for k in required if k not in obj]
        if missing:
            raise DatasetError(f"{it.where}: missing key(s) {missing}; each item needs {list(required)}: add them")
        rows.append(obj)
    return rows


def load_word_lists(name_or_path: str) -> dict[str, list[str]]:
    path = resolve(name_or_path, ".json")
    try:
        d = json.loads(_decode(path))
    except json.JSONDecodeError as e:
        raise DatasetError(
            f'{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}): fix it; expected {{"name": [words...]}}'
        ) from None
    if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
        raise DatasetError(f'{path}: expected {{"name": [words...]}}: make it one object of word lists')
    return {k: [w.lower() for w in v] for k, v in d.items()}
