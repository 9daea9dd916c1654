"""Progress of a worker's whole share of the sweep: generation and scoring, as a tqdm bar on a terminal,
a plain log line every ~30 s in a log.

Two kinds of work are counted: generated tokens (updated after every decoding step, so the bar moves
within a batch; the budget is cells x max_new_tokens and shrinks when rows stop early) and scored
sequences (the forwards of perplexity, behaviour and next-token-KL scoring; the conductor plans how
many and settles each batch's count once it is scored). Each kind's cost is measured while the job
runs (seconds per token, seconds per scored sequence), so the percentage is elapsed time over elapsed
plus the time the remaining work takes at those costs, and 100% and ETA 0:00 come only at the end.
"""

from __future__ import annotations

import logging
import sys
import time

from steersweep.core.units import fmt_seconds

log = logging.getLogger("steersweep")
SEQ_TOKENS = 4.0  # a scored sequence's cost in generated tokens, until the first scoring forward measures it


class Progress:
    """Tokens made, sequences scored, rows finished, tok/s and ETA of one worker's share of the sweep.

    Args:
        rows: rows this worker will write; max_new_tokens: the per-row token budget.
        enabled: `cfg.progress` (and only the main rank shows it).
        every_s: seconds between log lines when stderr is not a terminal (a Slurm log).
        sequences: the scoring forwards planned (sequences); settled per batch (`scored_batch`).
    """

    def __init__(
        self, rows: int, max_new_tokens: int, enabled: bool = True, every_s: float = 30.0, stream=None,
        sequences: int = 0,
    ):  # fmt: skip
        from tqdm.auto import tqdm

        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.rows, self.rows_done, self.tokens = rows, 0, 0
        self.budget = rows * max_new_tokens
        self.seqs, self.seq_budget, self.batch_seqs = 0, sequences, 0
        self.gen_s = self.score_s = 0.0  # seconds spent generating / scoring (between progress events)
        self.every_s, self.t0 = every_s, time.perf_counter()
        self.last_event = self.last_line = self.t0
        self.logged = ""
        self.phase = "generating"
        self.detail_text, self.last_detail = "", 0.0
        self.bar = tqdm(total=1000, desc=self.phase, disable=not self.tty, file=self.stream, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")  # fmt: skip
        self._show()

    def _spent(self) -> float:
        now = time.perf_counter()
        dt, self.last_event = now - self.last_event, now
        return dt

    def step(self, tokens: int, released: int = 0) -> None:
        """`tokens` made in one decoding step; `released`: budget of rows that stopped early."""
        self.gen_s += self._spent()
        self.tokens += tokens
        if self.detail_text:  # the step ended what the detail described (e.g. the prompt pass)
            self.detail_text = ""
            self.bar.set_description_str(self.phase, refresh=False)
        self.budget -= released
        self._show()

    def scored(self, sequences: int) -> None:
        """`sequences` more went through a scoring forward."""
        self.score_s += self._spent()
        self.seqs += sequences
        self.batch_seqs += sequences
        self._show()

    def scored_batch(self, planned: int) -> None:
        """A batch's scoring is done: its planned sequences become the ones it really scored."""
        self.seq_budget += self.batch_seqs - planned
        self.batch_seqs = 0
        self._show()

    def rows_written(self, n: int) -> None:
        self.rows_done += n
        self._show()

    def set_phase(self, phase: str) -> None:
        """Name what runs now (e.g. "scoring behaviour 3/8"): shown at once, also in a log."""
        self.phase, self.detail_text = phase, ""
        self.bar.set_description_str(phase, refresh=True)
        self._tick()

    def detail(self, text: str) -> None:
        """Show what runs inside the phase now (e.g. "prompt pass, layer 12/30"), a few times a second at
        most: long forward passes (the first batch's prompts) would otherwise show no sign of life."""
        now = time.perf_counter()
        if now - self.last_detail < 0.25:
            return
        self.last_detail, self.detail_text = now, text
        self.bar.set_description_str(f"{self.phase}: {text}", refresh=True)
        self._tick()

    def remaining_s(self) -> float | None:
        """Seconds the work left takes at the costs measured so far (None before the first token)."""
        if self.tokens <= 0:
            return None
        per_token = self.gen_s / self.tokens
        per_seq = self.score_s / self.seqs if self.seqs else SEQ_TOKENS * per_token
        return max(self.budget - self.tokens, 0) * per_token + max(self.seq_budget - self.seqs, 0) * per_seq

    def fraction(self) -> float:
        left = self.remaining_s()
        spent = self.gen_s + self.score_s
        if left is None:
            return 0.0
        done = spent / (spent + left) if spent + left > 0 else 1.0
        return done if self.rows_done >= self.rows else min(done, 0.99)  # 100%: every row written

    def _status(self) -> str:
        rate = self.tokens / self.gen_s if self.gen_s > 0 else 0.0
        left = self.remaining_s()
        eta = fmt_seconds(left) if left is not None else "?"
        scored = f", {self.seqs}/{max(self.seq_budget, self.seqs)} scored" if self.seq_budget or self.seqs else ""
        return (
            f"{self.tokens}/{max(self.budget, self.tokens)} tokens{scored}, rows {self.rows_done}/{self.rows}, "
            f"{rate:.0f} tok/s, elapsed {fmt_seconds(time.perf_counter() - self.t0)}, ETA {eta}"
        )

    def _show(self) -> None:
        self.bar.n = round(1000 * self.fraction())
        self.bar.set_postfix_str(self._status(), refresh=False)
        self.bar.update(0)
        self._tick()

    def line(self) -> str:
        """One plain status line: what the bar shows, for logs."""
        phase = f"{self.phase} ({self.detail_text})" if self.detail_text else self.phase
        return f"progress: {phase}; {100 * self.fraction():.0f}%, {self._status()}"

    def _tick(self) -> None:
        if not self.enabled or self.tty:
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every_s:
            self.last_line, self.logged = now, self.line()
            log.info(self.logged)

    def close(self) -> None:
        self.bar.n = round(1000 * self.fraction())
        self.bar.refresh()
        self.bar.close()
        if self.enabled and not self.tty and self.line() != self.logged:
            log.info(self.line())
