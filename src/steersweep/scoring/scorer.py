"""Scoring stage: a finished batch of completions -> tidy rows with every configured metric.

Runs in the same job while the model is loaded. behavior_prob is a property of a (layer, alpha)
setting, not of one completion: it is scored lazily the first time a batch needs a setting, and
seeded from rows already written, so a job killed early and restarted never redoes it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from steersweep.generation import decode as generation
from steersweep.hooks import forward
from steersweep.hooks.layers import hook_name
from steersweep.inputs import encoding
from steersweep.inputs.datasets import items_form
from steersweep.model.memory import with_backoff
from steersweep.runs.folder import RunFolder
from steersweep.runs.grid import Batch, Cell
from steersweep.scoring import behavior, metrics
from steersweep.scoring.judge import Judge
from steersweep.vectors.vectorset import VectorSet

log = logging.getLogger(__name__)


def steering_of(cell, vsets: dict[tuple[str, str], VectorSet]) -> list[tuple]:
    """A cell's per-row steering: (layer, alpha, that layer's vector of the cell's concept and method,
    mode) for every layer it steers (`hooks.row_deltas`)."""
    vs = vsets[(cell.concept, cell.method)]
    return [(layer, cell.alpha, vs.vectors[layer], cell.mode) for layer in cell.steered_layers]


@dataclass(frozen=True)
class ScoreSettings:
    """What scoring needs from the config, read once by the conductor (`pipeline.sweep`): the
    scorer never sees the config."""

    model_name: str
    layers_path: str | None  # where the decoder layers are (model.layers_path; None: found)
    positions: str  # steering.positions: where behaviour items and KL prompts are steered
    chat_template: str  # generation.chat_template: how behaviour items are encoded
    metrics: tuple[str, ...]
    regex: dict
    length_normalize: bool  # eval.behavior_length_normalize
    judge: Any = None  # eval.judge (a JudgeConfig) or None


class Scorer:
    """Builds the rows of finished batches; holds what is reused across batches."""

    def __init__(
        self,
        settings: ScoreSettings,
        model,
        tokenizer,
        vsets: dict[tuple[str, str], VectorSet],
        inputs: dict,
        prompt_ids: dict[str, list[int]],
        folder: RunFolder,
    ):
        self.settings, self.model, self.tokenizer, self.vsets, self.inputs = settings, model, tokenizer, vsets, inputs
        self.prompt_ids = prompt_ids
        self.run_id = folder.path.name
        self.threads = torch.get_num_threads()  # recorded per row: float reductions may depend on it
        self.names = list(settings.metrics)
        self.patterns = dict(settings.regex)
        self.lists = inputs.get("word_lists", {})
        self.folder, self.worker = folder, ""
        # (setting, item set) -> its item rows: what each behavior_prob is the mean of (items.parquet)
        self.items: dict[tuple[tuple, str], list[dict]] = {}
        self.behavior = self._behavior_done() if "behavior_prob" in self.names else None
        self.kl = folder.setting_done("next_token_kl") if "next_token_kl" in self.names else None
        self.on_phase = lambda phase: None  # progress: told what scoring runs now
        self.on_scored = lambda sequences: None  # progress: told how many sequences each forward scored
        self.label = ""
        self.judge = None
        if settings.judge is not None:
            self.judge = Judge(settings.judge)
        # per (concept, method, layer set) constants of every row (hashing vectors per row would be wasted work)
        self.vec_ids: dict[tuple[str, str, str], str] = {}
        self.norms = {(*k, layer): vs.norm(layer) for k, vs in vsets.items() for layer in vs.vectors}

    def vector_id(self, c: Cell) -> str:
        key = (c.concept, c.method, c.label)
        if key not in self.vec_ids:
            self.vec_ids[key] = self.vsets[(c.concept, c.method)].set_id(c.steered_layers, c.label)
        return self.vec_ids[key]

    def setting(self, c: Cell) -> tuple[str, str, float, str, str]:
        """The key of a per-setting metric: (concept, layer set, alpha, method, mode) as the rows record
        them, so `RunFolder.setting_done` finds it again after a restart."""
        vs = self.vsets[(c.concept, c.method)]
        return (vs.concept, c.label, float(c.alpha), vs.method, c.mode)

    def phase(self, label: str) -> None:
        self.label = label
        self.on_phase(label)

    def planned_sequences(self, batches: list[Batch]) -> list[int]:
        """Per batch, about how many sequences its scoring will forward (the progress display's plan,
        settled per batch): perplexity per distinct decode; per setting not scored before (one alpha-0
        setting per concept), the behaviour items, and for next-token KL the prompts (plus the
        unsteered prompts once per scoring call; alpha 0 needs no forward there)."""

        def forwards(concept: str) -> int:  # one forward gives both A/B letters; a continuation takes two
            sets = [self.inputs["behavior_items"][concept], *self.inputs.get("behavior_sets", {}).values()]
            return sum(len(items) * (1 if items_form(items) == "ab" else 2) for items in sets)

        seen_b = {self._unit(k) for k in self.behavior or {}}
        seen_k = {self._unit(k) for k in self.kl or {}}
        out = []
        for b in batches:
            n = len({c.decode_key for c in b.cells}) if "perplexity" in self.names else 0
            units = {self._unit(self.setting(c)): c.concept for c in b.cells}
            if self.behavior is not None:
                n += sum(forwards(c) for u, c in units.items() if u not in seen_b)
                seen_b |= set(units)
            if self.kl is not None:
                new = [u for u in units if u not in seen_k and u[1] != "baseline"]
                n += len(self.prompt_ids) * (len(new) + 1) if new else 0
                seen_k |= set(units)
            out.append(n)
        return out

    @staticmethod
    def _unit(setting: tuple) -> tuple:
        """What one score stands for: a setting, or (concept, "baseline") for every alpha-0 setting."""
        return (setting[0], "baseline") if setting[2] == 0 else setting

    def rows(self, batch: Batch, outs: list[generation.Completion], seconds: float, worker: str) -> list[dict]:
        """The rows of a finished batch, every metric scored (progress told per forward batch)."""
        self.worker = worker
        last = [0]

        def tick(done: int, total: int) -> None:
            self.on_scored(max(done - last[0], 0))
            last[0] = done if done < total else 0  # the next scoring call counts from 0 again
            self.on_phase(f"{self.label}: {done}/{total} sequences")

        with forward.on_batches(tick):
            return self._rows(batch, outs, seconds, worker)

    def _rows(self, batch: Batch, outs: list[generation.Completion], seconds: float, worker: str) -> list[dict]:
        cells = batch.cells
        ppl = self.perplexity(cells, outs) if "perplexity" in self.names else [None] * len(cells)
        if self.behavior is not None:
            written: list[dict] = []
            self._score_settings(cells, self.behavior, lambda todo: self.behavior_table(todo, written), "behaviour",
                                 copy=lambda key, source: written.extend(self._copy_items(key, source)))  # fmt: skip
            self.folder.write_items(written, self.worker)  # before the batch's part: resumes find them
        if self.kl is not None:  # next-token KL from the unsteered model: once per setting, like behavior_prob
            self._score_settings(cells, self.kl, self.kl_table, "next-token KL")
        judged = self.judge.score([c.prompt for c in cells], [o.text for o in outs]) if self.judge else None
        rows = []
        for i, (c, o) in enumerate(zip(cells, outs, strict=True)):
            vs = self.vsets[(c.concept, c.method)]  # a set of layers: norms of its first layer, ids of all
            norm, resid = self.norms[(c.concept, c.method, c.layer)], vs.resid_norms.get(c.layer)
            row = {
                "run_id": self.run_id, "cell_id": c.cell_id, "batch_id": batch.batch_id, "model": self.settings.model_name,
                "layer": c.layer, "layers": c.label, "hook_name": hook_name(c.steered_layers, c.label),
                "alpha": c.alpha, "alpha_rel": c.alpha * norm / resid if resid else None,
                "vector_id": self.vector_id(c),
                "vector_norm": norm, "prompt_id": c.prompt_id,
                "prompt": c.prompt, "sample": c.sample, "seed": c.seed, "completion": o.text,
                "n_new_tokens": o.n_new_tokens, "stop_reason": o.stop_reason,
                "seconds": seconds / len(cells), "worker": worker, "threads": self.threads,
            }  # fmt: skip
            row.update(metrics.text_metrics(o.text, o.token_ids, self.names, self.lists, self.patterns))
            if ppl[i] is not None:
                row["perplexity"] = ppl[i]
            if judged is not None:
                row["judge_score"] = judged[i]
            if self.behavior is not None:
                row["behavior_prob"], row["behavior_prob_sem"] = self.behavior[self.setting(c)]
            if self.kl is not None:
                row["next_token_kl"], row["next_token_kl_sem"] = self.kl[self.setting(c)]
            row.update(concept=vs.concept, method=vs.method, mode=c.mode)
            rows.append(row)
        return rows

    def perplexity(self, cells, outs: list[generation.Completion]) -> list[float]:
        """Perplexity of each row's completion given its prompt (unsteered): once per distinct
        (prompt, completion), so the rows of one baseline decode get one value."""
        key = [(c.prompt_id, tuple(o.token_ids)) for c, o in zip(cells, outs, strict=True)]
        distinct = list(dict.fromkeys(key))
        self.phase(f"scoring perplexity of {len(distinct)} rows")
        values = with_backoff(lambda bs: metrics.perplexities(  # OOM: halve the scoring batch (memory.with_backoff)
            self.model, [self.prompt_ids[p] for p, _ in distinct], [list(ids) for _, ids in distinct],
            self.tokenizer.pad_token_id, bs, layers_path=self.settings.layers_path), 32, "perplexity")  # fmt: skip
        by_key = dict(zip(distinct, values, strict=True))
        return [by_key[k] for k in key]

    def _behavior_done(self) -> dict:
        """behavior_prob (mean, sem) of the settings already scored in the folder: from the item files (the
        mean of a setting's items on its concept's main set), else from rows of a folder made before them."""
        done = self.folder.behavior_done()
        items = self.folder.read_items()
        mains = set(self.inputs.get("behavior_main", {}).values())
        for key, g in items.groupby(["concept", "layers", "alpha", "method", "mode", "item_set"], sort=False):
            setting = (str(key[0]), str(key[1]), float(key[2]), str(key[3]), str(key[4]))
            rows = g.drop(columns="worker").to_dict("records")
            self.items[(setting, str(key[5]))] = rows
            if key[5] in mains:
                done[setting] = behavior.behavior_summary([(r["logp_match"], r["logp_other"]) for r in rows])
        return done

    def _copy_items(self, key: tuple, source: tuple) -> list[dict]:
        """An alpha-0 setting's item rows: its concept's baseline's, under its own setting."""
        out = []
        for (setting, item_set), rows in list(self.items.items()):
            if setting == source:
                mine = [{**r, "layers": key[1], "method": key[3], "mode": key[4], "layer": _first_layer(key[1])}
                        for r in rows]  # fmt: skip
                self.items[(key, item_set)] = mine
                out += mine
        return out

    def _score_settings(self, cells, done: dict, table, what: str, copy=None) -> None:
        """Score into `done` the settings of these cells not scored yet. Alpha 0 is the unsteered model
        whatever the layer set, method or mode: one alpha-0 setting per concept is scored (or found
        among those already scored) and every other alpha-0 setting of that concept takes its value."""
        new: dict[tuple, tuple[tuple, list[tuple], str]] = {}
        for c in cells:
            key = self.setting(c)
            if key not in done and key not in new:
                new[key] = (key, steering_of(c, self.vsets), c.concept)
        scored = {self._unit(k): k for k in sorted(done, key=str)}  # what stands for each unit already
        todo, copies = [], []
        for key in sorted(new, key=str):
            unit = self._unit(key)
            if unit in scored:  # an alpha-0 setting whose concept's baseline is scored
                copies.append((key, scored[unit]))
            else:
                scored[unit] = key
                todo.append(new[key])
        if todo:
            self.phase(f"scoring {what} at {len(todo)} settings")
            done.update(table(todo))
        for key, source in copies:
            done[key] = done[source]
            if copy is not None:
                copy(key, source)

    def behavior_table(self, settings: list[tuple[tuple, list[tuple], str]], item_rows: list[dict]) -> dict:
        """behavior_prob (mean, sem) per setting, scored once per setting with per-row steering, on
        the behaviour items of the setting's concept (`eval.behavior_dataset`, one per concept or one
        for all); the per-item scores of that set and of every `eval.behavior_sets` set go to `item_rows`.

        Answers are scored as the suffix of the jointly encoded context + answer, steered on
        `steering.positions`; `eval.behavior_length_normalize` scores the
        mean log-probability per answer token instead of the total.
        """
        st, tok = self.settings, self.tokenizer
        chat = encoding.use_chat_template(tok, st.chat_template)
        norm = st.length_normalize
        out = {}
        for concept in dict.fromkeys(concept for _, _, concept in settings):
            t0 = time.perf_counter()
            mine = [(key, steering) for key, steering, c in settings if c == concept]
            main = self.inputs["behavior_main"][concept]
            sets = {main: self.inputs["behavior_items"][concept], **self.inputs.get("behavior_sets", {})}
            for item_set, items in sets.items():
                enc = behavior.encode_behavior_items(tok, items, items_form(items), chat)
                rows = [steering for _, steering in mine]
                scores = with_backoff(lambda bs, enc=enc, rows=rows: behavior.behavior_item_scores(
                    self.model, enc, rows, encoding.pad_id_of(tok), bs, st.layers_path, st.positions, norm
                ), 32, "behavior_prob")  # fmt: skip
                for (key, _), per_item in zip(mine, scores, strict=True):
                    made = [
                        _item_row(key, item_set, it["id"], m, o) for it, (m, o) in zip(items, per_item, strict=True)
                    ]
                    self.items[(key, item_set)] = made
                    item_rows += made
                    if item_set == main:
                        out[key] = behavior.behavior_summary(per_item)
            log.info(
                "behavior_prob for %d settings x %d %s items (%s) in %.1f s",
                len(mine), sum(map(len, sets.values())), concept, ", ".join(sets), time.perf_counter() - t0,
            )  # fmt: skip
        return out

    def kl_table(self, settings: list[tuple[tuple, list[tuple], str]]) -> dict:
        """next_token_kl (mean, sem) per setting: KL(steered || unsteered) of the next-token
        distribution at the last position of each sweep prompt (`metrics.next_token_kl`)."""
        st = self.settings
        t0 = time.perf_counter()
        prompts = list(self.prompt_ids.values())
        rows = [steering for _, steering, _ in settings]
        res = with_backoff(lambda bs: metrics.next_token_kl(
            self.model, prompts, rows, encoding.pad_id_of(self.tokenizer), bs, st.layers_path, st.positions
        ), 32, "next_token_kl")  # fmt: skip
        dt = time.perf_counter() - t0
        log.info("next_token_kl for %d settings x %d prompts in %.1f s", len(settings), len(prompts), dt)
        return dict(zip([key for key, _, _ in settings], res, strict=True))


def _first_layer(label: str) -> int:
    """The first layer of a layer-set label ("10", "10+14"; "all" starts at 0)."""
    return 0 if label == "all" else int(label.split("+")[0])


def _item_row(setting: tuple, item_set: str, item_id: str, logp_match: float, logp_other: float) -> dict:
    """One row of the item table (results.ITEM_SCHEMA)."""
    concept, label, alpha, method, mode = setting
    propensity = logp_match - logp_other
    return {
        "concept": concept, "method": method, "mode": mode, "layers": label, "layer": _first_layer(label),
        "alpha": alpha, "item_set": item_set, "item_id": str(item_id), "logp_match": logp_match,
        "logp_other": logp_other, "propensity": propensity, "behavior_prob": behavior.sigmoid(propensity),
    }  # fmt: skip
