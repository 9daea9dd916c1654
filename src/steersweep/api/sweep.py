"""`ss.Sweep`: a sweep composed from the package's configs and run through the CLI's pipeline."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from steersweep.api.compose import _check_loaded, compose_config

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig


# ---------------------------------------------------------------------------------------------
# Sweeps


class Sweep:
    """One sweep (layers x alphas x prompts) as the CLI runs it, from Python.

    Attributes:
        cfg: the composed, validated config (what `run_experiment.py` would run).
        loaded: a model to reuse instead of loading one (`Loaded` or `(model, tokenizer)`).
        summary: what the last `run()` reported (rows written, run folder, table path).
    """

    def __init__(self, cfg: DictConfig, loaded: Sequence | None = None):
        """Validate `cfg` (as the CLI does before loading) and keep it; see `compose`."""
        from steersweep.core.errors import ConfigError
        from steersweep.pipeline.validate import validate_offline

        if cfg.task != "run":
            raise ConfigError(
                f"task={cfg.task}: a Sweep runs task=run; use steersweep.report() for reports, or the CLI"
            )
        hf = validate_offline(cfg)
        if loaded is not None:
            _check_loaded(cfg, hf, loaded)
        self.cfg = cfg
        self.loaded = loaded
        self.summary: dict | None = None

    def __repr__(self) -> str:
        st = self.cfg.steering
        return (
            f"Sweep(model={self.cfg.model.name}, layers={list(st.layers)}, alphas={list(st.alphas)}, "
            f"run_dir={str(self.run_dir)!r})"
        )

    @classmethod
    def compose(
        cls,
        model: str | None = None,
        overrides: Sequence[str] = (),
        *,
        experiment: str | None = None,
        run_dir: str | os.PathLike | None = None,
        loaded: Sequence | None = None,
    ) -> Sweep:
        """Compose the CLI's config: `Sweep.compose(model=M, experiment=E, overrides=[...])` is
        `steersweep model=M experiment=E ...` (`python run_experiment.py ...` in a checkout).
        A config composed elsewhere goes to the constructor: `Sweep(cfg)`.

        Args:
            model: a config of conf/model/ (default: the embedded smollm2_135m).
            overrides: command-line overrides, e.g. `["steering.layers=[10,14]", "eval=none"]`.
            experiment: a preset of conf/experiment/ (e.g. "quick").
            run_dir: the exact run folder; default `./results/<run_name or model-concept>-<hash>`
                under the working directory (`results_root`).
            loaded: reuse this model (from `steersweep.load`) instead of loading it in `run()`;
                it must be the checkpoint, dtype and quantization the config names.

        Raises:
            The package's user errors (`steersweep.app.USER_ERRORS`), with the CLI's messages.
        """
        ovr = [f"model={model}"] if model else []
        ovr += [f"experiment={experiment}"] if experiment else []
        cfg = compose_config([*ovr, *overrides])
        if run_dir is not None:
            cfg.run_dir = str(Path(run_dir).expanduser().absolute())
        return cls(cfg, loaded)

    @classmethod
    def from_config(
        cls,
        model: str | None = None,
        overrides: Sequence[str] = (),
        experiment: str | None = None,
        run_dir: str | os.PathLike | None = None,
        loaded: Sequence | None = None,
    ) -> Sweep:
        """The former name of `compose`, kept as an alias for existing code: it composes a config
        (it does not take one; `Sweep(cfg)` does). Same arguments, same result."""
        return cls.compose(model, overrides, experiment=experiment, run_dir=run_dir, loaded=loaded)

    @property
    def run_dir(self) -> Path:
        """The run folder this config's rows go to (`run_dir`, else named after its identity hash)."""
        from steersweep.runs.identity import folder_for, identity, identity_hash

        return folder_for(self.cfg, identity_hash(identity(self.cfg)))

    def run(self) -> pd.DataFrame:
        """Run (or resume) the sweep exactly as the CLI does; return the merged table.

        A second call resumes: finished batches are skipped (`self.summary["written"] == 0`).

        Returns:
            The run folder's results.parquet as a DataFrame, one row per cell (the CLI's rows);
            `df.attrs["run_dir"]` names the folder, so `report(df)` reports from it.
        """
        import pandas as pd

        from steersweep.core.errors import ResultsError
        from steersweep.pipeline import tasks as app

        if self.loaded is None:
            summary = app.run(self.cfg).value
        else:
            from steersweep.pipeline.sweep import run_sweep

            app.set_threads()
            summary = run_sweep(self.cfg, self.loaded[0], self.loaded[1], getattr(self.loaded, "info", None))
        for line in summary.pop("said", []):  # what the CLI says at the end, said in the notebook too
            print(line)
        self.summary = summary
        if "table" not in summary:
            raise ResultsError(
                f"{summary.get('present')}/{summary.get('cells')} cells present in {summary.get('run_dir')}: "
                "the other shards' batches are missing (see task=status)"
            )
        df = pd.read_parquet(summary["table"])
        df.attrs["run_dir"] = summary["run_dir"]
        df.attrs["report"] = _container(self.cfg.report)
        return df


def _container(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)
