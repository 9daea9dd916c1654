"""Python API for notebooks and scripts, on the same code path as the CLI (`steersweep`).

    import steersweep as ss
    run = ss.Sweep.compose(overrides=["steering.layers=[10,14]", "steering.alphas=[0,2]"])
    df = run.run()                  # the rows the CLI writes, read back from the run folder
    ss.report(df).show()            # or .save("report/")

A `Sweep` composes the real Hydra config (the package's conf/, same schema and validation as the
CLI) and runs `app.run` / `sweep.run_sweep`: same run folder, plan, resume and Parquet table. User
errors raise the package's exceptions (`steersweep.SteersweepError` subclasses, the CLI's
`steersweep.app.USER_ERRORS`) with the CLI's one-line messages.

Lower level, reusing one loaded model: `load`, `compute_vectors`, `steer`, `behavior_prob` (thin
wrappers over vectors.compute_caa, generation.generate_rows and metrics.behavior_probs), and
`steering`, a context manager that steers the model's own `generate` or forward with the same hook.
A model from `load` can also serve several sweeps: `Sweep.compose(..., loaded=ss.load())`.

Nothing heavy (torch, transformers, pandas) is imported until a function needs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .paths import CONF_DIR

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from omegaconf import DictConfig

    from .config import ReportConfig
    from .vectors import VectorSet

    Vectors = VectorSet | Mapping[int, torch.Tensor] | torch.Tensor

__all__ = [
    "Loaded",
    "Report",
    "Sweep",
    "behavior_prob",
    "compose_config",
    "compute_vectors",
    "load",
    "report",
    "steer",
    "steerability",
    "steering",
]


# ---------------------------------------------------------------------------------------------
# Config


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the shipped `conf/config.yaml` with command-line style overrides, as the CLI does.

    Args:
        overrides: e.g. `["model=llama8b", "steering.layers=[10,14]"]`.

    Returns:
        The composed config (typed by `steersweep.config.Config`), not yet validated.

    Raises:
        ConfigError: a misspelt key, a wrong type or an unknown group option, with the one-line
            message the CLI prints after `error:`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .cli import compose_error
    from .config import register_configs
    from .validate import ConfigError

    register_configs()
    # inside a Hydra app (or after the caller's own `initialize`), Hydra is global: set it aside for
    # this composition and put it back, so a sweep can start from a @hydra.main script or a notebook
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=[str(o) for o in overrides])
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(compose_error(e, [str(o) for o in overrides], CONF_DIR)) from None
    finally:
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)


def _override_value(v: Any) -> str:
    """A Python value in Hydra's override grammar (strings quoted)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---------------------------------------------------------------------------------------------
# Loading


class Loaded(tuple):
    """`(model, tokenizer)` as `load` returns it (unpacks as a pair), with where it came from.

    Attributes:
        model, tokenizer: the two halves.
        info: `loading.load_model`'s record (memory budget, device map), written into manifests.
        model_cfg: the `model` config it was loaded with; a `Sweep` given this model checks it is
            the checkpoint, dtype and quantization its own config asks for.
    """

    def __new__(cls, model: Any, tokenizer: Any, info: dict | None = None, model_cfg: Any = None) -> Loaded:
        self = super().__new__(cls, (model, tokenizer))
        self.info = info or {}
        self.model_cfg = model_cfg
        return self

    @property
    def model(self) -> Any:
        return self[0]

    @property
    def tokenizer(self) -> Any:
        return self[1]


def load(model: str | None = None, overrides: Sequence[str] = (), **memory: Any) -> Loaded:
    """Load a model and its tokenizer once, the way a sweep does (device_map + memory budget).

    Args:
        model: a config of conf/model/ (default: the config's default, the embedded SmolLM2-135M).
        overrides: more overrides, e.g. `["model.dtype=float32", "model.path=/ckpt/llama"]`.
        memory: `memory` config keys, e.g. `gpu_fraction=0.8, cpu="0"`.

    Returns:
        `Loaded(model, tokenizer)`: unpack it (`model, tok = ss.load()`) or pass it whole to
        `Sweep.compose(loaded=...)`. The tokenizer pads on the left.
    """
    from .app import set_threads
    from .loading import load_model
    from .validate import validate_model, validate_static

    ovr = [f"model={model}"] if model else []
    ovr += [f"memory.{k}={_override_value(v)}" for k, v in memory.items()]
    cfg = compose_config([*ovr, *overrides])
    cfg.steering.layers = [0]  # no grid here: only the model's own checks (checkpoint, files, layer list)
    validate_static(cfg)
    validate_model(cfg)
    set_threads()
    m, tok, info = load_model(cfg.model, cfg.memory)
    tok.padding_side = "left"
    return Loaded(m, tok, info, cfg.model)


MODEL_KEYS = ("path", "dtype", "quantization", "revision", "attn_implementation", "trust_remote_code")


def _check_loaded(cfg: DictConfig, hf, loaded: Sequence) -> None:
    """Refuse a loaded model that is not the one the sweep's config names (its rows would lie)."""
    from .loading import resolved_dtype_name, torch_dtype
    from .validate import ConfigError

    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise ConfigError("loaded= takes (model, tokenizer), e.g. the result of steersweep.load()")
    model = loaded[0]
    mc = getattr(model, "config", None)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        got, want = getattr(mc, key, None), getattr(hf, key, None)
        if got is not None and want is not None and got != want:
            raise ConfigError(
                f"the loaded model has {key}={got} but model={cfg.model.name} has {want}: load the sweep's "
                "model (steersweep.load(model=...)) or drop loaded="
            )
    model_cfg = getattr(loaded, "model_cfg", None)
    if model_cfg is not None:
        diff = []
        for key in MODEL_KEYS:
            a, b = model_cfg.get(key), cfg.model.get(key)
            if key == "dtype":
                a, b = resolved_dtype_name(a), resolved_dtype_name(b)
            if a != b:
                diff.append(f"model.{key}={a} (loaded) vs {b} (sweep)")
        if diff:
            raise ConfigError(
                f"the loaded model differs from the sweep's: {'; '.join(diff)}: load it with the same settings"
            )
    elif cfg.model.quantization is None and hasattr(model, "parameters"):
        want = torch_dtype(resolved_dtype_name(cfg.model.dtype))
        got = next(model.parameters()).dtype
        if got != want:
            raise ConfigError(
                f"the loaded model is {str(got).removeprefix('torch.')} but the sweep asks for model.dtype="
                f"{resolved_dtype_name(cfg.model.dtype)}: cast the model or set model.dtype"
            )


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
        from .validate import ConfigError, validate_offline

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
        from .plan import folder_for, identity, identity_hash

        return folder_for(self.cfg, identity_hash(identity(self.cfg)))

    def run(self) -> pd.DataFrame:
        """Run (or resume) the sweep exactly as the CLI does; return the merged table.

        A second call resumes: finished batches are skipped (`self.summary["written"] == 0`).

        Returns:
            The run folder's results.parquet as a DataFrame, one row per cell (the CLI's rows);
            `df.attrs["run_dir"]` names the folder, so `report(df)` reports from it.
        """
        import pandas as pd

        from . import app
        from .results import ResultsError

        if self.loaded is None:
            summary = app.run(self.cfg)
        else:
            from .sweep import run_sweep

            app.set_threads()
            summary = run_sweep(self.cfg, self.loaded[0], self.loaded[1], getattr(self.loaded, "info", None))
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
        from .reporting import write_report

        dirs = [self.folder, *self.compare]
        default = self.folder / "report"
        if path is None or Path(path).expanduser().absolute() == default.absolute():
            self.summary = write_report(dirs, self.cfg)
            return self.summary
        out = Path(path).expanduser()
        with tempfile.TemporaryDirectory(prefix="steersweep-report-") as tmp:
            stage = Path(tmp) / self.folder.name  # the summary's title names the run folder
            stage.mkdir()
            try:
                (stage / "results.parquet").symlink_to((self.folder / "results.parquet").absolute())
            except OSError:
                shutil.copy2(self.folder / "results.parquet", stage / "results.parquet")
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
    from .config import ReportConfig
    from .validate import ConfigError

    known = [f.name for f in fields(ReportConfig)]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ConfigError(f"report option(s) {unknown} unknown: use {', '.join(known)}")
    values = {k: v for k, v in (base or {}).items() if k in known}
    values.update(options)
    return ReportConfig(**values)


def _table_folder(path: str | os.PathLike) -> Path:
    """A run folder with a merged results.parquet (merged here if only parts exist, as task=report does)."""
    from .plan import read_plan_doc
    from .results import RunFolder
    from .validate import ConfigError

    folder = RunFolder(Path(path).expanduser())
    if not folder.path.is_dir():
        raise ConfigError(f"run folder {folder.path} does not exist: set run_dir to a run's folder")
    if not (folder.path / "results.parquet").is_file():
        doc = read_plan_doc(folder.path)
        folder.merge(keep={r[0] for r in doc["cells"]} if doc else None)
    return folder.path


def _backed_by(df: pd.DataFrame) -> Path | None:
    """The run folder a DataFrame from `Sweep.run()` was read from, if it still holds exactly its rows."""
    import pandas as pd

    run_dir = df.attrs.get("run_dir")
    table = Path(run_dir) / "results.parquet" if run_dir else None
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

    from .validate import ConfigError

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
            source.to_parquet(folder / "results.parquet", index=False)
    else:
        folder = _table_folder(source)
    cfg = _report_cfg(base, options)
    more = [*compare, *cfg.compare_runs]
    return Report(folder, tuple(_table_folder(p) for p in more), cfg)


# ---------------------------------------------------------------------------------------------
# Lower level: vectors, steered generation, behaviour probability on a loaded model


def _pairs(pairs: str | os.PathLike | Sequence) -> list[dict]:
    from .data import load_pairs
    from .vectors import VectorError

    if isinstance(pairs, (str, os.PathLike)):
        return load_pairs(str(pairs))
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, Mapping):
            p = dict(p)
        elif isinstance(p, (tuple, list)) and len(p) == 2:
            p = {"positive": p[0], "negative": p[1]}
        else:
            raise VectorError(f"pair {i} is a {type(p).__name__}: give (positive, negative) or a dict")
        if not isinstance(p.get("positive"), str) or not isinstance(p.get("negative"), str):
            raise VectorError(f"pair {i} needs text 'positive' and 'negative' entries")
        out.append(p)
    return out


def compute_vectors(
    model: Any,
    tokenizer: Any,
    pairs: str | os.PathLike | Sequence[tuple[str, str] | Mapping[str, str]],
    layers: int | Sequence[int],
    concept: str = "concept",
    read_at: str = "last",
    *,
    position: int = -1,
    chat_template: bool = False,
    batch_size: int = 16,
    layers_path: str | None = None,
    method: str = "mean_diff",
) -> VectorSet:
    """Steering vectors by contrastive activation addition (mean positive - mean negative).

    Args:
        model, tokenizer: a loaded model (`load`, or any transformers causal LM).
        pairs: a dataset name or path (as `vectors.dataset`), or `(positive, negative)` texts,
            or dicts in the pair form of `data.load_pairs` (CAA A/B pairs included).
        layers: decoder layer(s); a vector lives in the residual stream after its layer.
        concept: the name recorded in vector ids.
        read_at: last | answer | answer_mean (see `vectors.example_ids`).
        position: token read with `read_at="last"` in text pairs (-1 = last).
        chat_template: wrap each example in the tokenizer's chat template.
        batch_size: examples per forward pass.
        layers_path: dotted path to the decoder layers if auto-detection fails.
        method: mean_diff | pca_diff | pca_center | logistic (as `vectors.method`).

    Returns:
        A `VectorSet` (`.vectors[layer]`, `.norm(layer)`, `.resid_norms`); save it with
        `steersweep.vectors.save(vs, "v.safetensors")` for `vectors=file`.
    """
    from .vectors import compute_caa

    layer_list = [layers] if isinstance(layers, int) else [int(x) for x in layers]
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return compute_caa(
        model, tokenizer, _pairs(pairs), layer_list, concept, position, batch_size, chat_template, layers_path, name,
        read_at, method,
    )  # fmt: skip


def _settings(model, n: int, layer, alpha, vectors: Vectors, layers_path: str | None) -> list[tuple]:
    """Per row (layer, alpha, vector), from scalars or one value per row."""
    import torch

    from .hooks import get_layers
    from .validate import ConfigError
    from .vectors import VectorError, VectorSet

    layers = [layer] * n if isinstance(layer, int) else [int(x) for x in layer]
    alphas = [alpha] * n if isinstance(alpha, (int, float)) else [float(x) for x in alpha]
    if len(layers) != n or len(alphas) != n:
        raise ConfigError(f"{n} rows but {len(layers)} layers and {len(alphas)} alphas: give one, or one per row")
    n_layers = len(get_layers(model, layers_path))
    hidden = getattr(model.config, "hidden_size", None)
    table = vectors.vectors if isinstance(vectors, VectorSet) else vectors
    out = []
    for layer_, alpha_ in zip(layers, alphas, strict=True):
        if not 0 <= layer_ < n_layers:
            raise ConfigError(f"layer {layer_} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        if isinstance(table, torch.Tensor):
            v = table
        elif layer_ in table:
            v = table[layer_]
        else:
            raise VectorError(f"no vector for layer {layer_}; the vectors have layers {sorted(table)}")
        if v.ndim != 1 or (hidden is not None and v.numel() != hidden):
            raise VectorError(
                f"vector for layer {layer_} has shape {tuple(v.shape)}; the model's hidden size is {hidden}"
            )
        out.append((layer_, float(alpha_), v))
    return out


def steer(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[str],
    layer: int | Sequence[int],
    alpha: float | Sequence[float],
    vectors: Vectors,
    max_new_tokens: int = 32,
    *,
    positions: str = "all",
    mode: str = "add",
    chat_template: str = "auto",
    system_prompt: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    layers_path: str | None = None,
) -> list[str]:
    """Steered completions of a batch of prompts, each row with its own (layer, alpha) if wanted.

    The sweep's generator (`generation.generate_rows`): KV cache, per-row steering, prompts in the
    chat template when the tokenizer has one (`chat_template="auto"`), neutral greedy decoding.

    Args:
        model, tokenizer: a loaded model (`load`, or any transformers causal LM).
        prompts: one prompt or a list.
        layer, alpha: one for every row, or one per prompt; alpha 0 is the unsteered model.
        vectors: a `VectorSet`, `{layer: tensor}`, or one tensor used at any layer.
        max_new_tokens: tokens generated per completion.
        positions: all | prompt | generated (last prompt token onward) | from:K (as `steering.positions`).
        mode: add | ablate | ablate_add | norm_preserving (as `steering.mode`).
        chat_template: auto | on | off (as `generation.chat_template`).
        system_prompt: system message for the chat template.
        do_sample, temperature, top_p, seed: sampling; each row's seed derives from `seed` and its
            (prompt, layer, alpha, repeat), so a row samples alike in any batch.
        batch_size: rows per `generate` call (halved while the device runs out of memory).
        layers_path: dotted path to the decoder layers if auto-detection fails.

    Returns:
        The completions (text after the prompt, special tokens dropped), in prompt order.
    """
    from .config import GenerationConfig
    from .encoding import encode_prompts
    from .generation import PromptError, generate_rows
    from .memory import generate_with_backoff
    from .plan import cell_seed
    from .validate import ConfigError

    rows = [prompts] if isinstance(prompts, str) else list(prompts)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be > 0")
    _check_steering(positions, mode)
    if chat_template not in ("auto", "on", "off"):
        raise ConfigError(f"chat_template={chat_template}: use auto, on or off")
    if not rows:
        return []
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
        chat_template=chat_template, system_prompt=system_prompt,
    )  # fmt: skip
    steering = _settings(model, len(rows), layer, alpha, vectors, layers_path)
    ids = encode_prompts(tokenizer, rows, gen)
    ctx = getattr(model.config, "max_position_embeddings", None)
    for i, x in enumerate(ids):
        if ctx and len(x) + max_new_tokens > ctx:
            raise PromptError(f"prompt {i} plus max_new_tokens={max_new_tokens} exceeds the model's context of {ctx}")
    seeds = None
    if do_sample:
        seen: Counter = Counter()
        seeds = []
        for p, (layer_, alpha_, _) in zip(rows, steering, strict=True):
            seeds.append(cell_seed(seed, "api", layer_, alpha_, p, seen[(p, layer_, alpha_)]))
            seen[(p, layer_, alpha_)] += 1
    out: list[str] = []

    def run(chunk: list[int]):
        return generate_rows(
            model, tokenizer, [ids[i] for i in chunk], [(*steering[i], mode) for i in chunk], gen,
            [seeds[i] for i in chunk] if seeds else None, positions, layers_path,
        )  # fmt: skip

    # chunks of batch_size rows, halved on out-of-memory (the sweep's back-off); rows keep their order
    generate_with_backoff(
        run, list(range(len(rows))), max(1, batch_size), lambda c, o, s: out.extend(x.text for x in o)
    )
    return out


@contextlib.contextmanager
def steering(
    model: Any,
    vectors: Vectors,
    *,
    layer: int | Sequence[int],
    alpha: float | Sequence[float],
    mode: str = "add",
    positions: str = "all",
    layers_path: str | None = None,
) -> Iterator[None]:
    """Steer the model's own forward passes while the block runs, with the sweep's hook
    (`hooks.row_deltas` + `hooks.steer`): `model.generate`, a forward, anything that runs the layers.

        with ss.steering(model, vs, layer=14, alpha=4.0):           # every row of any batch
            out = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=32)
        with ss.steering(model, vs, layer=[10, 14], alpha=[0, 2]):  # row b of a 2-row batch: its own
            logits = model(**batch).logits

    The hooks are removed when the block ends, also when it raises.

    Args:
        model: a loaded model (`load`, or any transformers causal LM).
        vectors: a `VectorSet` (`compute_vectors`), `{layer: tensor}`, or one tensor used at any layer.
        layer, alpha: one for every row (a batch of any size), or one per batch row (the batch
            must then have that many rows); alpha 0 is the unsteered model.
        mode: add | ablate | ablate_add | norm_preserving (as `steering.mode`).
        positions: all | prompt | generated (as `steering.positions`). With prompt or generated the
            block's first forward is taken as the prompt: one `generate` call per block. For from:K,
            which needs each row's prompt length, use `steer`.
        layers_path: dotted path to the decoder layers if auto-detection fails.

    Raises:
        ConfigError, VectorError: a layer out of range, a missing vector, lists of other lengths.
    """
    from .hooks import row_deltas
    from .hooks import steer as hooked
    from .validate import ConfigError

    _check_steering(positions, mode)
    if positions.startswith("from:"):
        raise ConfigError(f"positions={positions} needs each row's prompt length: use steersweep.steer for it")
    per_row = [len(x) for x in (layer, alpha) if not isinstance(x, (int, float))]
    if len(set(per_row)) > 1:
        raise ConfigError(
            f"layer has {per_row[0]} values and alpha {per_row[1]}: give one value, or one per batch row, each"
        )
    if per_row:
        rows = [(*r, mode) for r in _settings(model, max(per_row), layer, alpha, vectors, layers_path)]
        deltas = row_deltas(rows, positions)
    else:
        rows = [(*r, mode) for r in _settings(model, 1, layer, alpha, vectors, layers_path)]
        deltas = row_deltas(rows, positions, every_row=True)
    with hooked(model, deltas, layers_path):
        yield


def behavior_prob(
    model: Any,
    tokenizer: Any,
    items: str | os.PathLike | Sequence[Mapping[str, str]],
    layer: int,
    alpha: float,
    vectors: Vectors,
    fmt: str = "continuation",
    *,
    limit: int | None = None,
    chat_template: str = "auto",
    positions: str = "all",
    mode: str = "add",
    length_normalize: bool = False,
    batch_size: int = 32,
    layers_path: str | None = None,
    per_item: bool = False,
) -> float | pd.DataFrame:
    """The sweep's `behavior_prob` at one (layer, alpha): mean p(matching answer) over two-choice items.

    p(matching) = sigmoid(lp(matching) - lp(other)), each answer scored as the suffix of the
    jointly encoded context + answer under the steering (`metrics.behavior_probs`).

    Args:
        model, tokenizer: a loaded model (`load`, or any transformers causal LM).
        items: a dataset name or path (as `eval.behavior_dataset`), or items in the form of
            `fmt`: continuation {"prefix", "positive", "negative"}; ab {"question", "A", "B",
            "positive": "A" or "B"}.
        layer, alpha, vectors: the steering (alpha 0 = unsteered); vectors as in `steer`.
        fmt: continuation | ab (as `eval.behavior_format`).
        limit: score only the first `limit` items (as `eval.behavior_limit`).
        chat_template: auto | on | off; A/B items go in the chat template when it is used.
        positions: all | prompt (the context) | generated (the context's last token and the answer) | from:K.
        mode: add | ablate | ablate_add | norm_preserving (as `steering.mode`).
        length_normalize: compare mean (not total) log-probability per answer token.
        batch_size: sequences per forward pass.
        layers_path: dotted path to the decoder layers if auto-detection fails.

        per_item: return every item's scores instead of their mean.

    Returns:
        The mean over items, in [0, 1] (0.5 = no preference); with `per_item`, a DataFrame with one row
        per item: item_id, logp_match, logp_other, propensity (their difference), behavior_prob (the
        item table's columns, as a sweep writes them to items.parquet).
    """
    from . import metrics as M
    from .data import load_behavior_items
    from .generation import use_chat_template
    from .validate import ConfigError

    if fmt not in ("continuation", "ab"):
        raise ConfigError(f"fmt={fmt}: use continuation or ab")
    if isinstance(items, (str, os.PathLike)):
        rows = load_behavior_items(str(items), fmt)
    else:
        rows = [dict(x) for x in items]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ConfigError("no behaviour items to score")
    enc = M.encode_behavior_items(tokenizer, rows, fmt, use_chat_template(tokenizer, chat_template))
    _check_steering(positions, mode)
    setting = [(*r, mode) for r in _settings(model, 1, layer, alpha, vectors, layers_path)]
    (scores,) = M.behavior_item_scores(
        model, enc, setting, M.pad_id_of(tokenizer), batch_size, layers_path, positions, length_normalize
    )
    if not per_item:
        return M.behavior_summary(scores)[0]
    import pandas as pd

    return pd.DataFrame(
        [{"item_id": str(r["id"]), "logp_match": m, "logp_other": o, "propensity": m - o,
          "behavior_prob": M.sigmoid(m - o)} for r, (m, o) in zip(rows, scores, strict=True)]
    )  # fmt: skip


def steerability(items) -> pd.DataFrame:
    """The steerability table of a sweep (`steersweep.reliability`): per concept, method, mode, layer set
    and item set, the mean slope of item propensity against alpha with its 95% interval, the share of
    anti-steerable items, Spearman and the fit's residual.

    Args:
        items: a run folder, its items.parquet, or the item table as a DataFrame.
    """
    import pandas as pd

    from .reliability import steerability as table
    from .results import RunFolder
    from .validate import ConfigError

    if not isinstance(items, pd.DataFrame):
        path = Path(items)
        path = RunFolder(path).items_path if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(
                f"{path} not found: give a run folder whose sweep scored behavior_prob (it writes items.parquet)"
            )
        items = pd.read_parquet(path)
    return table(items)


def _check_steering(positions: str, mode: str) -> None:
    """One line saying what to use, before any forward (the grammar lives in hooks)."""
    from .hooks import MODES, POSITIONS_HELP, parse_positions
    from .validate import ConfigError

    try:
        parse_positions(positions)
    except ValueError:
        raise ConfigError(f"positions={positions}: {POSITIONS_HELP}") from None
    if mode not in MODES:
        raise ConfigError(f"mode={mode}: use one of {', '.join(MODES)}")
