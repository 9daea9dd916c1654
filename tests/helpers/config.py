"""The real config, composed from the checkout's conf/ as Hydra composes it for a run."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers.checkout import CONF
from steersweep.core.config import register_configs

register_configs()

PRESET = "experiment=phase1_small"  # 2 layers x 4 alphas x 6 prompts = 48 cells on the embedded model
# Runs compared with `direct` use other batch plans (shards, 4-row batches, ranks): rows equal across
# batch plans only in float32, so these comparisons pin it (bf16: same plan only, see test_faults).
FP32 = "model.dtype=float32"


def make(*overrides: str, **sets):
    """Compose the real config; `sets` are assigned after composing (paths need no override quoting:
    `make(vectors__path=p)` sets vectors.path)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    for key, value in sets.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, merge=False)
    return cfg
