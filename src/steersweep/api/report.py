"""`ss.report`: a report from a table, a run folder or a Sweep, shown in a notebook or saved."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steersweep.api.sweep import Sweep, _container
from steersweep.runs.folder import RunFolder

if TYPE_CHECKING:
    import pandas as pd

    from steersweep.core.config import ReportConfig


# ---------------------------------------------------------------------------------------------
# Reports

IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+\.png)\)")


@dataclass
class Report:
    """The report of a run folder's table; nothing is written until `save` or `show`.

    Attributes:
        folder: the run folder whose results.parquet the report is computed from.
        compare: more run folders shown side by side (report.compare_runs).
        cfg: the report settings (objective, fluency constraint).
        summary: summary.md once written.
    """

    folder: Path
    compare: tuple[Path, ...] = ()
    cfg: ReportConfig | None = None
    summary: Path | None = field(default=None, init=False)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the files `task=report` writes (summary.md, table_<metric>.csv, heatmap and
        curve PNGs per metric).

        Args:
            path: the folder to write them into; default the run folder's `report/`, where
                `task=report` writes (for a DataFrame without a run folder: a temporary folder).

        Returns:
            The path of summary.md.
        """
        from steersweep.reporting.write import write_report

        dirs = [self.folder, *self.compare]
        default = RunFolder(self.folder).report_dir
        if path is None or Path(path).expanduser().absolute() == default.absolute():
            self.summary = write_report(dirs, self.cfg)
            return self.summary
        out = Path(path).expanduser()
        with tempfile.TemporaryDirectory(prefix="steersweep-report-") as tmp:
            stage = Path(tmp) / self.folder.name  # the summary's title names the run folder
            stage.mkdir()
            table, staged = RunFolder(self.folder).results_path, RunFolder(stage).results_path
            try:
                staged.symlink_to(table.absolute())
            except OSError:
                shutil.copy2(table, staged)
            made = write_report([stage, *self.compare], self.cfg).parent
            out.mkdir(parents=True, exist_ok=True)
            for f in made.iterdir():
                shutil.copy2(f, out / f.name)
        self.summary = out / "summary.md"
        return self.summary

    def show(self) -> None:
        """In a notebook, display summary.md with its plots; elsewhere print summary.md's path.

        Writes the report first (`save()`) if it has not been written.
        """
        summary = self.summary or self.save()
        shell = None
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except ImportError:
            pass
        if shell is None or getattr(shell, "kernel", None) is None:  # not a notebook kernel
            print(f"report: {summary}")
            return
        from IPython.display import Image, Markdown, display

        text: list[str] = []
        for line in summary.read_text().splitlines():
            pngs = IMAGE.findall(line)
            if not pngs:
                text.append(line)
                continue
            if text:
                display(Markdown("\n".join(text)))
                text = []
            for png in pngs:
                display(Image(filename=str(summary.parent / png)))
        if text:
            display(Markdown("\n".join(text)))


def _report_cfg(base: Mapping | None, options: Mapping[str, Any]) -> ReportConfig:
    from steersweep.core.config import ReportConfig
    from steersweep.core.errors import ConfigError

    known = [f.name for f in fields(ReportConfig)]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ConfigError(f"report option(s) {unknown} unknown: use {', '.join(known)}")
    values = {k: v for k, v in (base or {}).items() if k in known}
    values.update(options)
    return ReportConfig(**values)


def _table_folder(path: str | os.PathLike) -> Path:
    """A run folder with a merged results.parquet (merged here if only parts exist, as task=report does)."""
    from steersweep.core.errors import ConfigError
    from steersweep.runs.planfile import read_plan_doc

    folder = RunFolder(Path(path).expanduser())
    if not folder.path.is_dir():
        raise ConfigError(f"run folder {folder.path} does not exist: set run_dir to a run's folder")
    if not folder.results_path.is_file():
        doc = read_plan_doc(folder.path)
        folder.merge(keep={r[0] for r in doc["cells"]} if doc else None)
    return folder.path


def _backed_by(df: pd.DataFrame) -> Path | None:
    """The run folder a DataFrame from `Sweep.run()` was read from, if it still holds exactly its rows."""
    import pandas as pd

    run_dir = df.attrs.get("run_dir")
    table = RunFolder(run_dir).results_path if run_dir else None
    if table is None or not table.is_file() or "cell_id" not in df:
        return None
    ids = pd.read_parquet(table, columns=["cell_id"])["cell_id"]
    return table.parent if len(ids) == len(df) and set(ids) == set(df["cell_id"]) else None


def report(source: pd.DataFrame | str | os.PathLike | Sweep, *compare: str | os.PathLike, **options: Any) -> Report:
    """The report of a sweep's table: `report(df).show()` or `report(df).save("report/")`.

    Args:
        source: a DataFrame from `Sweep.run()` (reported from its run folder), any DataFrame with
            the results columns (written into a temporary run folder first), a run folder, or a
            `Sweep` that has run.
        compare: more run folders in the same report (models side by side).
        options: report settings (`steersweep.config.ReportConfig`: objective, concept_metric,
            fluency_metric, max_fluency_increase); default the run's own `report` config.

    Returns:
        A `Report`; nothing is written until `.save()` or `.show()`.
    """
    import pandas as pd

    from steersweep.core.errors import ConfigError

    base = None
    if isinstance(source, Sweep):
        base = _container(source.cfg.report)
        source = source.run_dir
    if isinstance(source, pd.DataFrame):
        base = source.attrs.get("report")
        folder = _backed_by(source)
        if folder is None:
            if source.empty:
                raise ConfigError("the DataFrame has no rows to report")
            ids = source["run_id"].unique() if "run_id" in source else []
            name = str(ids[0]) if len(ids) == 1 else "dataframe"
            folder = Path(tempfile.mkdtemp(prefix="steersweep-")) / name
            folder.mkdir()
            source.to_parquet(RunFolder(folder).results_path, index=False)
    else:
        folder = _table_folder(source)
    cfg = _report_cfg(base, options)
    more = [*compare, *cfg.compare_runs]
    return Report(folder, tuple(_table_folder(p) for p in more), cfg)
