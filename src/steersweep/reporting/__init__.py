"""Stage 8, what a person reads: tidy tables and summaries (tables), the best cells (best),
heatmaps and curves (plots), the steerability section (steerability), the HTML page (html), and
the report folder written from a run's rows (write)."""
