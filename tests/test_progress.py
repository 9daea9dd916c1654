"""Progress in tokens: moves within a batch, shrinks its budget when rows stop early, logs in a log."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from omegaconf import OmegaConf

from steersweep.core.config import GenerationConfig
from steersweep.core.progress import Progress
from steersweep.generation.decode import generate_rows


def test_log_lines_without_a_terminal_and_budget_of_early_stops(caplog):
    caplog.set_level(logging.INFO, logger="steersweep")
    p = Progress(rows=4, max_new_tokens=10, enabled=True, every_s=0.0, stream=io.StringIO())
    assert not p.tty
    p.step(4)  # one step, four rows
    p.step(4, released=2 * 8)  # two rows stopped at step 2: 16 tokens of their budget will never come
    p.rows_written(4)
    p.set_phase("scoring behaviour at 2 settings")
    p.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) >= 3
    assert "8/24 tokens" in lines[-1] and "rows 4/4" in lines[-1] and "scoring behaviour" in lines[-1]
    assert len(set(lines)) == len(lines)  # no line repeated at close


def test_disabled_progress_is_silent(caplog):
    caplog.set_level(logging.INFO, logger="steersweep")
    p = Progress(rows=1, max_new_tokens=2, enabled=False, every_s=0.0, stream=io.StringIO())
    p.step(1)
    p.close()
    assert not [r for r in caplog.records if r.getMessage().startswith("progress:")]


def test_decode_loop_reports_every_step_and_the_budget_adds_up(tiny, tokenizer):
    """Tokens made plus the budget released by rows that stopped early = rows x max_new_tokens."""
    tiny.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(1, tiny.config.vocab_size, 10)]
    ids = [tokenizer(p)["input_ids"] for p in ["Hello there.", "Describe the sea.", "Hi", "A long day at work."]]
    steps: list[tuple[int, int, int]] = []
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=12))
    v = torch.randn(32) * 3
    out = generate_rows(tiny, tokenizer, ids, [(1, 1.0, v), (2, 2.0, v), (1, -1.0, v), (3, 1.5, v)], gen,
                        on_step=lambda t, f, s: steps.append((t, f, s)))  # fmt: skip
    assert [s for _, _, s in steps] == list(range(len(steps)))  # called once per step, in order
    accounted = sum(t + f * (12 - s - 1) for t, f, s in steps)
    assert accounted == 4 * 12
    assert sum(f for _, f, _ in steps) == sum(c.stop_reason == "eos" for c in out) > 0


def test_prompt_pass_reports_each_layer_and_leaves_tokens_unchanged(tiny, tokenizer):
    """The first forward (every prompt of the batch) ticks once per decoder layer, with and without the
    shared prefix, and the ticks change nothing in the rows; the detail shows in the log line."""
    ids = [tokenizer(p)["input_ids"] for p in ["Hello there.", "Describe the sea at night."]]
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=5))
    v = torch.randn(32) * 3
    rows = [(1, 1.0, v), (2, -1.0, v)]
    n = tiny.config.num_hidden_layers
    for positions, passes in [("all", 1), ("generated", 2)]:  # generated: shared prefix, then last token
        ticks: list[tuple[int, int]] = []
        plain = generate_rows(tiny, tokenizer, ids, rows, gen, positions=positions)
        ticked = generate_rows(tiny, tokenizer, ids, rows, gen, positions=positions,
                               on_layer=lambda i, k, ticks=ticks: ticks.append((i, k)))  # fmt: skip
        assert [c.token_ids for c in ticked] == [c.token_ids for c in plain]
        assert ticks == [(i, n) for i in range(1, n + 1)] * passes
    p = Progress(2, 5, stream=io.StringIO(), every_s=0.0)
    p.detail("prompt pass, layer 1/2")
    assert "generating (prompt pass, layer 1/2)" in p.line()
    p.step(2)
    assert "prompt pass" not in p.line()


def test_scoring_reports_every_forward_batch(tiny, tokenizer):
    """Long scoring phases move the progress line: one call per forward batch, ending at the total."""
    from steersweep.hooks import forward
    from steersweep.scoring import metrics

    ids = [tokenizer(p)["input_ids"] for p in ["One.", "Two words.", "Three more words.", "Four", "Five!"]]
    calls: list[tuple[int, int]] = []
    with forward.on_batches(lambda done, total: calls.append((done, total))):
        metrics.perplexities(tiny, ids, [[5, 6, 7]] * len(ids), tokenizer.pad_token_id, batch_size=2)
    assert calls == [(2, 5), (4, 5), (5, 5)]
    metrics.perplexities(tiny, ids, [[5, 6, 7]] * len(ids), tokenizer.pad_token_id, batch_size=2)
    assert len(calls) == 3  # outside the block nobody is told


def test_tokens_of_a_decode_that_ran_out_of_memory_are_counted_once(tiny, embedded_dir, tmp_path, monkeypatch, caplog):
    """A decode that fails with out-of-memory after some steps is retried with half the rows: the
    progress line counts the retried tokens once (same totals as a run without the failure)."""
    import re

    from helpers.models import tiny_checkpoint

    import steersweep as ss
    from steersweep.generation import decode as G

    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    over = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=3",
            "generation.max_new_tokens=6", "eval.metrics=[]", "steering.layers=[1]", "steering.alphas=[0,3]",
            "progress_every_s=0", "report.enabled=false"]  # fmt: skip
    real = G.generate_rows
    failed = []

    def flaky(*args, on_step=None, **kw):
        if not failed:  # the first decode makes three steps of tokens, then runs out of memory
            failed.append(True)
            for step in range(3):
                on_step(len(args[2]), 0, step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, on_step=on_step, **kw)

    def last_line(run_dir) -> str:
        caplog.clear()
        caplog.set_level(logging.INFO, logger="steersweep")
        ss.Sweep.from_config(overrides=over, run_dir=run_dir).run()
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
        return re.search(r"(\d+/\d+) tokens", lines[-1]).group(1)

    plain = last_line(tmp_path / "plain")
    monkeypatch.setattr(G, "generate_rows", flaky)
    assert last_line(tmp_path / "oom") == plain and failed


def test_scoring_still_ahead_keeps_the_bar_below_100(caplog):
    """Generation done, scoring not: the job is not finished, so neither is the bar (it used to read
    100% and ETA 0:00 with a third to a half of the wall time still ahead)."""
    import time

    caplog.set_level(logging.INFO, logger="steersweep")
    p = Progress(rows=2, max_new_tokens=3, enabled=True, every_s=0.0, stream=io.StringIO(), sequences=10)
    for _ in range(3):
        time.sleep(0.01)
        p.step(2)
    assert p.tokens == p.budget and p.fraction() < 1 and p.remaining_s() > 0
    time.sleep(0.02)
    p.scored(5)  # half of the scoring: its measured cost now sets the ETA
    per_seq = p.score_s / 5
    assert p.remaining_s() == pytest.approx(5 * per_seq) and 0 < p.fraction() < 1
    p.scored(3)
    p.scored_batch(10)  # the batch planned 10 and scored 8: the plan settles to what ran
    p.rows_written(2)
    assert p.seq_budget == 8 and p.fraction() == 1 and p.remaining_s() == 0
    p.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert "100%" in lines[-1] and "8/8 scored" in lines[-1] and "ETA 0m00s" in lines[-1]
    assert not any("100%" in x for x in lines[:-1])


def test_a_sweeps_progress_reaches_100_only_when_its_last_batch_is_scored(tiny, embedded_dir, tmp_path, caplog):
    """A real sweep with every scoring phase: no progress line says 100% before the last one, the
    lines during scoring name it, and the last line accounts for every token and scored sequence."""
    import re

    from helpers.models import tiny_checkpoint

    import steersweep as ss

    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    over = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=4",
            "generation.max_new_tokens=6", "generation.batch_size=4", "steering.layers=[1,2]",
            "steering.alphas=[0,3]", "eval.behavior_limit=8", "progress_every_s=0", "report.enabled=false",
            "eval.metrics=[behavior_prob,next_token_kl,perplexity]"]  # fmt: skip
    caplog.set_level(logging.INFO, logger="steersweep")
    ss.Sweep.from_config(overrides=over, run_dir=tmp_path / "run").run()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    pct = [int(re.search(r"; (\d+)%", x).group(1)) for x in lines]
    assert pct[-1] == 100 and max(pct[:-1]) < 100, "\n".join(lines)
    assert any("scoring" in x for x, p in zip(lines, pct, strict=True) if p > 0)
    done, total = map(int, re.search(r"(\d+)/(\d+) scored", lines[-1]).groups())
    assert done == total > 0 and "rows 16/16" in lines[-1] and "ETA 0m00s" in lines[-1]
