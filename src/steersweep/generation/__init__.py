"""Stage 4, steered completions: many sweep cells per batch with a KV cache and per-row seeds
(decode), and the no-cache loop the benchmarks compare with (baselines)."""
