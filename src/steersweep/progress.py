"""Progress of a sweep in tokens: a tqdm bar on a terminal, a plain log line every ~30 s in a log.

The unit is the generated token, updated after every decoding step, so the bar moves within a
batch. Its total starts as the token budget (cells x max_new_tokens) and shrinks when rows stop
early (EOS), so the ETA is the time the remaining budget takes at the measured rate. Phases that
make no tokens (vectors, scoring) say what they do in the bar's description.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("steersweep")


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Tokens made, rows finished, tok/s and ETA of one worker's share of the sweep.

    Args:
        rows: rows this worker will write; max_new_tokens: the per-row token budget.
        enabled: `cfg.progress` (and only the main rank shows it).
        every_s: seconds between log lines when stderr is not a terminal (a Slurm log).
    """

    def __init__(self, rows: int, max_new_tokens: int, enabled: bool = True, every_s: float = 30.0, stream=None):
        from tqdm.auto import tqdm

        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.rows, self.rows_done, self.tokens = rows, 0, 0
        self.budget = rows * max_new_tokens
        self.every_s, self.t0 = every_s, time.perf_counter()
        self.last_line, self.logged = self.t0, ""
        self.phase = "generating"
        self.detail_text, self.last_detail = "", 0.0
        self.bar = tqdm(total=self.budget, unit="tok", desc=self.phase, disable=not self.tty, file=self.stream,
                        dynamic_ncols=True, smoothing=0.05)  # fmt: skip
        self._postfix()

    def step(self, tokens: int, released: int = 0) -> None:
        """`tokens` made in one decoding step; `released`: budget of rows that stopped early."""
        self.tokens += tokens
        if self.detail_text:  # the step ended what the detail described (e.g. the prompt pass)
            self.detail_text = ""
            self.bar.set_description_str(self.phase, refresh=False)
        if released:
            self.budget -= released
            self.bar.total = self.budget
        self.bar.update(tokens)
        self._tick()

    def rows_written(self, n: int) -> None:
        self.rows_done += n
        self._postfix()
        self._tick()

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

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"rows {self.rows_done}/{self.rows}", refresh=False)

    def line(self) -> str:
        """One plain status line: what the bar shows, for logs."""
        el = time.perf_counter() - self.t0
        rate = self.tokens / el if el > 0 else 0.0
        left = max(self.budget - self.tokens, 0)
        eta = fmt_seconds(left / rate) if rate > 0 else "?"
        pct = 100 * self.tokens / self.budget if self.budget else 100.0
        phase = f"{self.phase} ({self.detail_text})" if self.detail_text else self.phase
        return (
            f"progress: {phase}; {self.tokens}/{self.budget} tokens ({pct:.0f}%), rows {self.rows_done}/"
            f"{self.rows}, {rate:.0f} tok/s, elapsed {fmt_seconds(el)}, ETA {eta}"
        )

    def _tick(self) -> None:
        if not self.enabled or self.tty:
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every_s:
            self.last_line, self.logged = now, self.line()
            log.info(self.logged)

    def close(self) -> None:
        self.bar.close()
        if self.enabled and not self.tty and self.line() != self.logged:
            log.info(self.line())
