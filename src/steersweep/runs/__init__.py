"""Stage 6, a run and its folder: the grid of cells and batches (grid), what a run's identity is
(identity), the plan file and its claim (planfile), Slurm shards and the commands that resume a run
(launch), the run folder and every file name in it (folder), provenance, and multi-GPU ranks
(distributed)."""
