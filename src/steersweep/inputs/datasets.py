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

import json
import re
from pathlib import Path

from steersweep.core.errors import DatasetError
from steersweep.inputs.records import (
    KEYS,
    LABELS,
    Item,
    _decode,
    _given_id,
    _need,
    _obj,
    _records,
    _text,
    _unique,
    content_id,
    read_items,
    resolve,
)

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


# ---------------------------------------------------------------------------------------------
# Finding and reading files


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
