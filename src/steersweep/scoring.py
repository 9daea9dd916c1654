"""Scoring stage: a finished batch of completions -> tidy rows with every configured metric.

Runs in the same job while the model is loaded. behavior_prob is a property of a (layer, alpha)
setting, not of one completion: it is scored lazily the first time a batch needs a setting, and
seeded from rows already written, so a job killed early and restarted never redoes it.
"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from . import generation as G
from . import metrics as M
from .hooks import hook_name
from .memory import with_backoff
from .plan import Batch, Cell
from .results import RunFolder
from .vectors import VectorSet

log = logging.getLogger(__name__)


def steering_of(cell, vsets: dict[tuple[str, str], VectorSet]) -> list[tuple]:
    """A cell's per-row steering: (layer, alpha, that layer's vector of the cell's concept and method,
    mode) for every layer it steers (`hooks.row_deltas`)."""
    vs = vsets[(cell.concept, cell.method)]
    return [(layer, cell.alpha, vs.vectors[layer], cell.mode) for layer in cell.steered_layers]


class Scorer:
    """Builds the rows of finished batches; holds what is reused across batches."""

    def __init__(
        self,
        cfg: DictConfig,
        model,
        tokenizer,
        vsets: dict[tuple[str, str], VectorSet],
        inputs: dict,
        prompt_ids: dict[str, list[int]],
        folder: RunFolder,
    ):
        self.cfg, self.model, self.tokenizer, self.vsets, self.inputs = cfg, model, tokenizer, vsets, inputs
        self.prompt_ids = prompt_ids
        self.run_id = folder.path.name
        self.names = list(cfg.eval.metrics)
        self.patterns = dict(cfg.eval.regex)
        self.lists = inputs.get("word_lists", {})
        self.behavior = folder.behavior_done() if "behavior_prob" in self.names else None
        self.kl = folder.setting_done("next_token_kl") if "next_token_kl" in self.names else None
        self.on_phase = lambda phase: None  # progress: told what scoring runs now
        self.label = ""
        self.judge = None
        if cfg.eval.judge is not None:
            from .judge import Judge

            self.judge = Judge(cfg.eval.judge)
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

    def rows(self, batch: Batch, outs: list[G.Completion], seconds: float, worker: str) -> list[dict]:
        """The rows of a finished batch, every metric scored (progress told per forward batch)."""
        with M.on_batches(lambda done, total: self.on_phase(f"{self.label}: {done}/{total} sequences")):
            return self._rows(batch, outs, seconds, worker)

    def _rows(self, batch: Batch, outs: list[G.Completion], seconds: float, worker: str) -> list[dict]:
        cfg, cells = self.cfg, batch.cells
        if "perplexity" in self.names:
            self.phase(f"scoring perplexity of {len(cells)} rows")
        ppl = (
            with_backoff(lambda bs: M.perplexities(  # OOM: halve the scoring batch (memory.with_backoff)
                self.model, [self.prompt_ids[c.prompt_id] for c in cells], [o.token_ids for o in outs],
                self.tokenizer.pad_token_id, bs, layers_path=cfg.model.layers_path), 32, "perplexity")
            if "perplexity" in self.names else [None] * len(cells)
        )  # fmt: skip
        if self.behavior is not None:
            new = self._new_settings(cells, self.behavior)
            if new:
                self.phase(f"scoring behaviour at {len(new)} settings")
                self.behavior.update(self.behavior_table(new))
        if self.kl is not None:  # next-token KL from the unsteered model: once per setting, like behavior_prob
            new = self._new_settings(cells, self.kl)
            if new:
                self.phase(f"scoring next-token KL at {len(new)} settings")
                self.kl.update(self.kl_table(new))
        judged = self.judge.score([c.prompt for c in cells], [o.text for o in outs]) if self.judge else None
        rows = []
        for i, (c, o) in enumerate(zip(cells, outs, strict=True)):
            vs = self.vsets[(c.concept, c.method)]  # a set of layers: norms of its first layer, ids of all
            norm, resid = self.norms[(c.concept, c.method, c.layer)], vs.resid_norms.get(c.layer)
            row = {
                "run_id": self.run_id, "cell_id": c.cell_id, "batch_id": batch.batch_id, "model": cfg.model.name,
                "layer": c.layer, "layers": c.label, "hook_name": hook_name(c.steered_layers, c.label),
                "alpha": c.alpha, "alpha_rel": c.alpha * norm / resid if resid else None,
                "vector_id": self.vector_id(c),
                "vector_norm": norm, "prompt_id": c.prompt_id,
                "prompt": c.prompt, "sample": c.sample, "seed": c.seed, "completion": o.text,
                "n_new_tokens": o.n_new_tokens, "stop_reason": o.stop_reason,
                "seconds": seconds / len(cells), "worker": worker,
            }  # fmt: skip
            row.update(M.text_metrics(o.text, o.token_ids, self.names, self.lists, self.patterns))
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

    def _new_settings(self, cells, done: dict) -> list[tuple[tuple, list[tuple], str]]:
        """The settings of these cells not scored yet: [(setting key, its per-row steering, the
        cell's configured concept)]."""
        out: dict[tuple, tuple[tuple, list[tuple], str]] = {}
        for c in cells:
            key = self.setting(c)
            if key not in done and key not in out:
                out[key] = (key, steering_of(c, self.vsets), c.concept)
        return [out[k] for k in sorted(out, key=str)]

    def behavior_table(self, settings: list[tuple[tuple, list[tuple], str]]) -> dict:
        """behavior_prob (mean, sem) per setting, scored once per setting with per-row steering, on
        the behaviour items of the setting's concept (`eval.behavior_dataset`, one per concept or one
        for all).

        Answers are scored as the suffix of the jointly encoded context + answer, steered on
        `steering.positions`; `eval.behavior_length_normalize` scores the
        mean log-probability per answer token instead of the total.
        """
        cfg, tok = self.cfg, self.tokenizer
        chat = G.use_chat_template(tok, cfg.generation.chat_template)
        norm = bool(cfg.eval.behavior_length_normalize)
        out = {}
        for concept in dict.fromkeys(concept for _, _, concept in settings):
            t0 = time.perf_counter()
            mine = [(key, steering) for key, steering, c in settings if c == concept]
            items = self.inputs["behavior_items"][concept]
            enc = M.encode_behavior_items(tok, items, cfg.eval.behavior_format, chat)
            rows = [steering for _, steering in mine]
            res = with_backoff(lambda bs, enc=enc, rows=rows: M.behavior_probs(
                self.model, enc, rows, M.pad_id_of(tok), bs, cfg.model.layers_path, cfg.steering.positions, norm
            ), 32, "behavior_prob")  # fmt: skip
            log.info(
                "behavior_prob for %d settings x %d %s items in %.1f s",
                len(mine), len(enc), concept, time.perf_counter() - t0,
            )  # fmt: skip
            out.update(zip([key for key, _ in mine], res, strict=True))
        return out

    def kl_table(self, settings: list[tuple[tuple, list[tuple], str]]) -> dict:
        """next_token_kl (mean, sem) per setting: KL(steered || unsteered) of the next-token
        distribution at the last position of each sweep prompt (`metrics.next_token_kl`)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = list(self.prompt_ids.values())
        rows = [steering for _, steering, _ in settings]
        res = with_backoff(lambda bs: M.next_token_kl(
            self.model, prompts, rows, M.pad_id_of(self.tokenizer), bs, cfg.model.layers_path, cfg.steering.positions
        ), 32, "next_token_kl")  # fmt: skip
        dt = time.perf_counter() - t0
        log.info("next_token_kl for %d settings x %d prompts in %.1f s", len(settings), len(prompts), dt)
        return dict(zip([key for key, _, _ in settings], res, strict=True))
