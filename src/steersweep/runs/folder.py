"""Tidy results: one Parquet row per completion, written part by part, atomically.

A run folder holds:
    manifest.json        resolved config, git commit, package versions, device map, vectors
    parts/*.parquet      one file per finished batch (written as .tmp, fsynced, then renamed)
    results.parquet      the merged table (merge step; rebuilt from the parts at any time)
Readers only ever see whole part files, so a job killed at any moment leaves either a complete
part or none; resume reads the cell ids of the parts present and skips them.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from steersweep.core.errors import ResultsError
from steersweep.core.fileio import atomic_write_bytes, clean_stale_tmp

log = logging.getLogger(__name__)

# Fixed columns; metric columns (float64) are appended after these.
SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("cell_id", pa.string()),
        ("batch_id", pa.string()),  # the planned batch the row was generated in
        ("model", pa.string()),
        ("layer", pa.int32()),  # the first (lowest) layer of the steered set
        ("layers", pa.string()),  # the steered set: "10", "10+14" or "all" (each layer with its own vector)
        ("hook_name", pa.string()),
        ("alpha", pa.float64()),
        ("alpha_rel", pa.float64()),
        ("vector_id", pa.string()),
        ("vector_norm", pa.float64()),
        ("concept", pa.string()),  # the steered concept (vectors.concept)
        ("method", pa.string()),  # how the vector was found: mean_diff | pca_diff | pca_center | logistic | file's
        ("mode", pa.string()),  # how it was applied: add | ablate | ablate_add | norm_preserving
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("sample", pa.int32()),
        ("seed", pa.int64()),
        ("completion", pa.string()),
        ("n_new_tokens", pa.int32()),
        ("stop_reason", pa.string()),
        ("seconds", pa.float64()),
        ("worker", pa.string()),
        ("decode_rows", pa.int32()),  # distinct rows of the decode that made it: the planned batch's, or a memory cut
        # torch intra-op threads of the worker that made it: on some CPUs (AMX) the float reductions, so the last
        # digits of float32 scores, depend on it (README: What is bit-exact)
        ("threads", pa.int32()),
    ]
)
FIXED = [f.name for f in SCHEMA]
# Keys whose values never reach a manifest (HF_TOKEN, *_secret, password...). Whole-word endings:
# "max_new_tokens" is not a secret. Values shaped like Hugging Face tokens are redacted anywhere.
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|access_key)$", re.IGNORECASE)
SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


# The item table (items.parquet): one row per behaviour item scored at one setting, the numbers behind each
# setting's behavior_prob (its mean) and the run's steerability (reliability.steerability).
ITEM_SCHEMA = pa.schema(
    [
        ("concept", pa.string()),
        ("method", pa.string()),
        ("mode", pa.string()),
        ("layers", pa.string()),  # the steered set's label, as results.parquet's `layers`
        ("layer", pa.int32()),  # its first layer
        ("alpha", pa.float64()),
        ("item_set", pa.string()),  # which behaviour set: eval.behavior_dataset's, or one of eval.behavior_sets
        ("item_id", pa.string()),
        ("logp_match", pa.float64()),  # log-probability of the matching answer (per token with length_normalize)
        ("logp_other", pa.float64()),
        ("propensity", pa.float64()),  # logp_match - logp_other
        ("behavior_prob", pa.float64()),  # sigmoid(propensity)
        ("worker", pa.string()),
    ]
)
ITEM_KEY = ["concept", "method", "mode", "layers", "alpha", "item_set", "item_id"]


def table_from_rows(rows: list[dict]) -> pa.Table:
    """Rows -> Arrow table with the fixed schema first and metric columns as float64."""
    metric_cols = sorted({k for r in rows for k in r} - set(FIXED))
    fields = list(SCHEMA) + [pa.field(c, pa.float64()) for c in metric_cols]
    cols = {f.name: [r.get(f.name) for r in rows] for f in fields}
    return pa.table(cols, schema=pa.schema(fields))


class RunFolder:
    """A run's results folder: parts, manifest, merge. It owns every name in the folder; other
    modules ask it for paths (`results_path`, `plan_path`, `vectors_path`, `logs`, `report_dir`)."""

    RESULTS = "results.parquet"
    PLAN = "plan.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.parts = self.path / "parts"
        self.item_parts = self.path / "items"  # item-*.parquet: per-item behaviour scores, one file per scoring
        self.logs = self.path / "logs"  # the run log of every job that worked in the folder
        self.report_dir = self.path / "report"  # the default report folder

    @property
    def results_path(self) -> Path:
        """The merged table (rebuilt from the parts at any time)."""
        return self.path / self.RESULTS

    @property
    def plan_path(self) -> Path:
        """plan.json: the claimed identity, cells and batches (`runs.planfile`)."""
        return self.path / self.PLAN

    def vectors_path(self, keys: list[tuple[str, str]], key: tuple[str, str]) -> Path:
        """Where the run keeps computed vectors, per (concept, method) of `keys` (the run's, in grid
        order): `vectors.safetensors` for the first, `vectors-<method>.safetensors` (one concept) or
        `vectors-<concept>-<method>.safetensors` for the others."""
        if key == keys[0]:
            return self.path / "vectors.safetensors"
        concept, method = key
        one_concept = len({c for c, _ in keys}) == 1
        return self.path / (
            f"vectors-{method}.safetensors" if one_concept else f"vectors-{concept}-{method}.safetensors"
        )

    def create(self) -> None:
        blocker = next((p for p in (self.path, *self.path.parents) if p.exists() and not p.is_dir()), None)
        if blocker == self.path:  # mkdir would say "Not a directory", which reads as a permission problem
            raise ResultsError(
                f"results folder {self.path} is a file, not a folder: choose another run_dir or results_root"
            )
        if blocker is not None:
            raise ResultsError(
                f"results folder {self.path} cannot be made: {blocker} is a file: choose another run_dir or results_root"
            )
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
            probe = self.parts / f".probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
            stale = clean_stale_tmp(self.parts) + clean_stale_tmp(self.path)  # parts; manifest, vectors
            stale += clean_stale_tmp(self.item_parts) if self.item_parts.is_dir() else []
            for tmp in stale:
                log.info("removed %s, left by a writer that was killed", tmp.name)
        except OSError as e:
            raise ResultsError(
                f"results folder {self.path} is not writable ({e.strerror}): choose another run_dir or results_root"
            ) from None

    # -- parts -----------------------------------------------------------------------------
    def write_part(self, rows: list[dict], worker: str) -> Path:
        """Write one finished chunk of rows as a new part file, atomically."""
        name = f"part-{worker}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        path = self.parts / name
        table = table_from_rows(rows)
        try:
            atomic_write_bytes(path, lambda tmp: pq.write_table(table, tmp))
        except OSError as e:  # disk full, quota, folder gone: no part (and no tmp file) is left behind
            raise ResultsError(
                f"cannot write a part file in {self.parts} ({e.strerror or e}): free disk space or choose another "
                "run_dir; rerun the same command to resume"
            ) from e
        return path

    @property
    def items_path(self) -> Path:
        """The merged item table (`merge_items`)."""
        return self.path / "items.parquet"

    @property
    def steerability_path(self) -> Path:
        """The steerability table the report computes from the item table."""
        return self.path / "steerability.parquet"

    def write_items(self, rows: list[dict], worker: str) -> Path | None:
        """Write the item rows of one scoring (every setting it scored, all items) as one file, atomically,
        before the batch's part: a setting's items are in the folder whole or not at all."""
        if not rows:
            return None
        self.item_parts.mkdir(exist_ok=True)
        path = self.item_parts / f"item-{worker}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        table = pa.Table.from_pylist([{**r, "worker": worker} for r in rows], schema=ITEM_SCHEMA)
        try:
            atomic_write_bytes(path, lambda tmp: pq.write_table(table, tmp))
        except OSError as e:
            raise ResultsError(
                f"cannot write an item file in {self.item_parts} ({e.strerror or e}): free disk space or choose "
                "another run_dir; rerun the same command to resume"
            ) from e
        return path

    def read_items(self) -> pd.DataFrame:
        """Every item row written so far (a setting scored twice, by two shards at once: the first file's)."""
        frames = []
        for p in sorted(self.item_parts.glob("item-*.parquet")) if self.item_parts.is_dir() else []:
            try:
                frames.append(pq.read_table(p).to_pandas())
            except Exception:  # half-written by a killed writer cannot happen (atomic), a foreign file can
                log.warning("skipping unreadable item file %s", p)
        if not frames:
            return ITEM_SCHEMA.empty_table().to_pandas()
        return pd.concat(frames, ignore_index=True).drop_duplicates(ITEM_KEY, keep="first").reset_index(drop=True)

    def merge_items(self) -> tuple[pd.DataFrame, Path] | None:
        """items.parquet from the item files, sorted like results.parquet (None when nothing was scored)."""
        df = self.read_items()
        if df.empty:
            return None
        df = df.sort_values(["concept", "method", "mode", "layer", "layers", "item_set", "alpha", "item_id"],
                            kind="stable").reset_index(drop=True)  # fmt: skip
        out = self.items_path
        table = pa.Table.from_pandas(df, schema=ITEM_SCHEMA, preserve_index=False)
        atomic_write_bytes(out, lambda tmp: pq.write_table(table, tmp))
        return df, out

    def part_files(self) -> list[Path]:
        return sorted(p for p in self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def read_parts(self, columns: list[str] | None = None) -> tuple[list[pd.DataFrame], list[Path]]:
        """Every readable part; unreadable ones (half-written by a crashed writer) are reported."""
        frames, bad = [], []
        for p in self.part_files():
            try:
                frames.append(pq.read_table(p, columns=columns).to_pandas())
            except Exception:  # a truncated or foreign file: skip, never crash the merge
                bad.append(p)
        for p in bad:
            log.warning("skipping unreadable part file %s (half-written or corrupt)", p)
        return frames, bad

    def done_cells(self) -> set[str]:
        frames, _ = self.read_parts(columns=["cell_id"])
        return set().union(*(set(f["cell_id"]) for f in frames)) if frames else set()

    def behavior_done(self) -> dict[tuple[str, str, float, str, str], tuple[float, float]]:
        """(concept, layers, alpha, method, mode) -> (behavior_prob, its sem) from rows already written."""
        return self.setting_done("behavior_prob")

    def setting_done(self, metric: str) -> dict[tuple[str, str, float, str, str], tuple[float, float]]:
        """(concept, layers, alpha, method, mode) -> (metric, its `<metric>_sem`) from rows already written:
        per-setting metrics (behavior_prob, next_token_kl) are scored once per folder, also across
        restarts (`scoring.Scorer.setting` makes the same key)."""
        cols = ["concept", "layers", "alpha", "method", "mode", metric, f"{metric}_sem"]
        out = {}
        for p in self.part_files():
            try:
                if not set(cols) <= set(pq.read_schema(p).names):
                    continue
                df = pq.read_table(p, columns=cols).to_pandas().dropna()
            except Exception:  # unreadable parts are reported by read_parts
                continue
            for r in df.itertuples(index=False):
                key = (str(r.concept), str(r.layers), float(r.alpha), str(r.method), str(r.mode))
                out[key] = (float(r[5]), float(r[6]))
        return out

    def merge(self, csv: bool = False, keep: set[str] | None = None) -> tuple[pd.DataFrame, Path]:
        """Concatenate all parts into results.parquet: one row per cell id, sorted; items.parquet likewise.

        Args:
            keep: the plan's cell ids; rows of any other cell are left out of the table.
        """
        frames, bad = self.read_parts()
        if not frames:
            raise ResultsError(f"no readable part files under {self.parts}: nothing to merge")
        df = pd.concat(frames, ignore_index=True)
        if keep is not None:
            df = df[df["cell_id"].isin(keep)]
        n = len(df)
        df = df.drop_duplicates("cell_id", keep="first")
        if len(df) < n:
            log.warning("merge dropped %d duplicate rows (same cell written twice)", n - len(df))
        df = df.sort_values(
            ["concept", "method", "mode", "layer", "layers", "alpha", "prompt_id", "sample"], kind="stable"
        ).reset_index(drop=True)
        out = self.results_path
        table = pa.Table.from_pandas(df, preserve_index=False)
        atomic_write_bytes(out, lambda tmp: pq.write_table(table, tmp))
        if csv:
            atomic_write_bytes(self.path / "results.csv", lambda tmp: df.to_csv(tmp, index=False))
        self.merge_items()  # the item table beside it (behaviour scores per item)
        if bad:
            log.warning("merge skipped %d unreadable part file(s)", len(bad))
        return df, out

    # -- manifest ----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, manifest: dict) -> None:
        text = json.dumps(scrub(manifest), indent=2, sort_keys=True, default=str)
        atomic_write_bytes(self.manifest_path, lambda tmp: Path(tmp).write_text(text))


def scrub(obj):
    """Drop values under secret-looking keys, recursively (HF_TOKEN never reaches a manifest)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        return SECRET_VALUE.sub("<redacted>", obj)
    return obj
