"""Every config composes; typos fail at compose time; impossible values fail before loading."""

from __future__ import annotations

import pytest
from helpers.checkout import CONF
from helpers.config import make
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from steersweep.core.errors import ConfigError
from steersweep.pipeline.validate import validate_static


def group_options():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "local")):
        for f in sorted(group.glob("*.yaml")):
            yield f"{group.name}={f.stem}"


@pytest.mark.parametrize("override", list(group_options()))
def test_every_config_composes(override):
    extra = ["vectors.path=x.safetensors"] if override == "vectors=file" else []
    cfg = make(override, *extra)
    if override.startswith("model="):
        assert cfg.model.num_hidden_layers and cfg.model.recommended_layers
    if not override.startswith("model="):
        validate_static(cfg)


def test_misspelt_key_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="alpah"):
        make("steering.alpah=[1]")
    with pytest.raises(ConfigCompositionException, match="dtpye"):
        make("model.dtpye=float32")


def test_misspelt_key_in_yaml_fails_at_compose(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    text = (conf / "steering" / "default.yaml").read_text().replace("samples:", "sampels:")
    (conf / "steering" / "default.yaml").write_text(text)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="sampels"):
            compose(config_name="config")


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="alphas"):
        make("steering.alphas=[a,b]")
    with pytest.raises(ConfigCompositionException, match="max_new_tokens"):
        make("generation.max_new_tokens=many")


@pytest.mark.parametrize(
    "override, message",
    [
        ("memory.offload_state_dict=true", "offload_state_dict=true is refused"),
        ("memory.gpu_fraction=1.5", "must be in \\(0, 1\\]"),
        ("memory.gpu_fraction=0", "must be in \\(0, 1\\]"),
        ("memory.disk_offload=true", "offload_folder"),
        ("memory.cpu=12Gb", "cannot read size"),
        ("steering.layers=[]", "steering.layers is empty"),
        ("steering.alphas=[]", "steering.alphas is empty"),
        ("steering.positions=middle", "use all, prompt, generated or from:K"),
        ("steering.positions=from:x", "use all, prompt, generated or from:K"),
        ("steering.mode=subtract", "steering.mode=subtract: use one of add, ablate"),
        ("vectors.method=ica", "vectors.method=ica: use one of mean_diff"),
        ("steering.samples=3", "do_sample"),
        ("generation.max_new_tokens=0", "must be > 0"),
        ("generation.top_p=0", "top_p"),
        ("vectors.source=file", "vectors.path"),
        ("eval.metrics=[bleu]", "unknown"),
        ("task=train", "unknown"),
        ("model.device_map=everywhere", "device_map"),
    ],
)
def test_bad_values_one_line_errors(override, message):
    cfg = make(override)
    with pytest.raises(ConfigError, match=message) as e:
        validate_static(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model", [f.stem for f in sorted((CONF / "model").glob("*.yaml"))])
def test_the_default_grid_is_the_models_own(model):
    """`model=llama70b` sweeps its own recommended layers (20-48 of 80) and alphas, not the embedded
    model's 10, 14, 18; a grid given on the command line still wins."""
    cfg = make(f"model={model}")
    assert list(cfg.steering.layers) == list(cfg.model.recommended_layers)
    assert list(cfg.steering.alphas) == list(cfg.model.recommended_alphas) and 0.0 in cfg.steering.alphas
    assert all(0 <= layer < cfg.model.num_hidden_layers for layer in cfg.steering.layers)
    validate_static(cfg)
    mine = make(f"model={model}", "steering.layers=[3]", "steering.alphas=[0,1]")
    assert list(mine.steering.layers) == [3] and list(mine.steering.alphas) == [0, 1]


def test_task_plan_says_which_grid_it_took_and_why():
    import subprocess
    import sys

    def plan(*args):
        r = subprocess.run([sys.executable, "run_experiment.py", "task=plan", *args], cwd=CONF.parent,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    out = plan("model=llama70b")
    assert "16 prompts x 5 layers x 7 alphas = 560 cells" in out
    assert "layers [20, 26, 32, 40, 48] (model llama70b's recommended_layers; set steering.layers to choose)" in out
    assert "alphas [-4, -2, -1, 0, 1, 2, 4] (model llama70b's recommended_alphas" in out
    out = plan("model=llama70b", "steering.layers=[30]")
    assert "layers [30] (steering.layers)" in out and "1 layers x 7 alphas" in out


def test_the_configs_ship_in_the_package_and_conf_links_there():
    from steersweep.core.paths import CONF_DIR

    assert CONF.is_symlink() and CONF.resolve() == CONF_DIR and (CONF_DIR / "config.yaml").is_file()


def test_a_users_config_dir_is_searched_and_checked_in_one_line(tmp_path):
    """`--config-dir DIR`: the user's experiment beside the shipped ones, and its mistakes as one line."""
    import subprocess
    import sys

    mine = tmp_path / "it's my conf"
    (mine / "experiment").mkdir(parents=True)
    (mine / "experiment" / "mine.yaml").write_text("# @package _global_\nsteering:\n  layers: [3, 7]\n")

    def cli(*args):
        return subprocess.run([sys.executable, str(CONF.parent / "run_experiment.py"), "--config-dir", str(mine),
                               *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip

    ok = cli("experiment=mine", "task=plan")
    assert ok.returncode == 0 and "layers [3, 7] (steering.layers)" in ok.stdout, ok.stderr[-2000:]
    bad = cli("experiment=nope")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: In 'config': Could not find 'experiment/nope'; available: mine, phase1_large, phase1_small, quick"
    ]
    assert list(tmp_path.iterdir()) == [mine]  # nothing written where it ran
