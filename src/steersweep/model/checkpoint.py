"""Finding a model: its path (a folder, a hub id, the embedded model), its config without the
weights, and whether the hub can be reached."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from steersweep.core.config import ModelConfig
from steersweep.core.errors import LoadError
from steersweep.core.paths import PACKAGE_DIR
from steersweep.model.embedded import DEFAULT_MODEL_DIR, STAMP, prepare

MODEL_CONFIGS = PACKAGE_DIR / "model_configs"


# ---------------------------------------------------------------------------------------------
# Reading the model's config without weights


def resolve_model_path(model: ModelConfig) -> str:
    """The checkpoint to load: `model.path`, or the embedded default model (converted on demand)."""
    if model.path:
        return os.path.expanduser(model.path)

    return str(prepare(DEFAULT_MODEL_DIR))


def read_model_config(model: ModelConfig, need_checkpoint: bool = True):
    """The model's transformers config, read from config.json only (no weights).

    Uses the checkpoint's own config.json when the checkpoint is reachable; otherwise the shipped
    `model.config_json` (enough for planning and validation, not for loading).
    """
    from transformers import AutoConfig

    path = model.path
    if path is None:
        if (DEFAULT_MODEL_DIR / STAMP).exists() or need_checkpoint:
            path = resolve_model_path(model)
    local = path is not None and Path(os.path.expanduser(path)).is_dir()
    if local:
        return AutoConfig.from_pretrained(os.path.expanduser(path), trust_remote_code=model.trust_remote_code)
    shipped = _shipped_config(model)
    if not need_checkpoint and shipped is not None:
        return shipped  # planning: the shipped config.json is all that is needed
    if path and _looks_like_hub_id(path):
        online, why = hub_online()
        try:  # a hub id: its config.json from the hub, or from the local hub cache when offline
            return AutoConfig.from_pretrained(
                path, revision=model.revision, trust_remote_code=model.trust_remote_code, local_files_only=not online
            )
        except OSError:
            raise LoadError(
                f"model {path!r} is neither a local folder nor reachable on the hub: "
                + ("" if online else f"{why}, and the local hub cache does not hold it; ")
                + f"download it and set model.path (or the environment variable named in conf/model/{model.name}.yaml)"
                " to the folder"
            ) from None
    raise LoadError(
        f"model path {path!r} is not a folder with a config.json: set model.path to a local checkpoint "
        f"(or the environment variable named in conf/model/{model.name}.yaml)"
    )


def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path))


@functools.cache
def hub_online(timeout_s: float = 2.0) -> tuple[bool, str]:
    """Whether the model hub can be reached, and why not: HF_HUB_OFFLINE, or one TCP connection
    attempt of `timeout_s` (without it, huggingface_hub retries for about 23 s before giving up)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return False, f"no network: {host}:{port} unreachable ({e.strerror or type(e).__name__})"
    return True, "online"


def _shipped_config(model: ModelConfig):
    from transformers import AutoConfig

    if not model.config_json:
        return None
    p = Path(model.config_json)
    if not p.is_absolute():
        p = MODEL_CONFIGS / p
    if not p.is_file():
        raise LoadError(f"shipped model config {p} not found: fix model.config_json")
    d = json.loads(p.read_text())
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)
