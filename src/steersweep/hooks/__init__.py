"""Stage 2, where the residual stream is changed: finding a model's decoder layers (layers), the
per-row steering hook and its modes (rows), one forward for rows that share a steering prefix
(trunk), and the steered forward with a shared KV cache that generation and scoring both use
(forward)."""
