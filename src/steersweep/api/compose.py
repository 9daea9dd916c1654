"""The API's config and model: `compose_config` (the CLI's Hydra config from overrides) and `load`
(a model and tokenizer loaded once, reusable by several sweeps and the lower-level calls)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from steersweep.core.paths import CONF_DIR

if TYPE_CHECKING:
    from omegaconf import DictConfig


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

    from steersweep.core.config import register_configs
    from steersweep.core.errors import ConfigError
    from steersweep.pipeline.cli import compose_error

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
    from steersweep.model.loading import load_model
    from steersweep.pipeline.tasks import set_threads
    from steersweep.pipeline.validate import validate_model, validate_static

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
    from steersweep.core.errors import ConfigError
    from steersweep.model.dtypes import resolved_dtype_name, torch_dtype

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
