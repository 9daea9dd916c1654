"""Python API for notebooks and scripts, on the same code path as the CLI (`steersweep`).

    import steersweep as ss
    run = ss.Sweep.compose(overrides=["steering.layers=[10,14]", "steering.alphas=[0,2]"])
    df = run.run()                  # the rows the CLI writes, read back from the run folder
    ss.report(df).show()            # or .save("report/")

A `Sweep` composes the real Hydra config (the package's conf/, same schema and validation as the
CLI) and runs `pipeline.tasks.run` / `pipeline.sweep.run_sweep`: same run folder, plan, resume and Parquet table. User
errors raise the package's exceptions (`steersweep.SteersweepError` subclasses, the CLI's
`steersweep.core.errors.USER_ERRORS`) with the CLI's one-line messages.

Lower level, reusing one loaded model: `load`, `compute_vectors`, `steer`, `behavior_prob` (thin
wrappers over vectors.directions.compute_caa, generation.decode.generate_rows and
scoring.behavior.behavior_probs), and
`steering`, a context manager that steers the model's own `generate` or forward with the same hook.
A model from `load` can also serve several sweeps: `Sweep.compose(..., loaded=ss.load())`.

Nothing heavy (torch, transformers, pandas) is imported until a function needs it.

Modules: compose (config and model), sweep, report, steer (your own model, steered), scores
(behaviour probability and steerability).
"""
