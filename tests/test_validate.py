"""The bad-input corpus: every impossible config, override, vector file, dataset and environment fails
with one line that names the fix, a non-zero exit, and no partial results, before any weight is read.

Library cases call `sweep.run_sweep` (the same path the CLI takes) with model loading patched to fail
the test, so a case that slipped past validation is caught rather than run. A subset drives the real
CLI in a subprocess. docs/bad-inputs.md lists every case with its message and fix.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import config
from helpers.checkout import CONF, ROOT
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from safetensors.torch import save_file

from steersweep.core.errors import USER_ERRORS, ConfigError, ResultsError
from steersweep.pipeline.validate import validate_static
from steersweep.runs.folder import RunFolder
from steersweep.vectors.vectorset import VectorSet, save

pytestmark = pytest.mark.badinput

EMBEDDED = ROOT / ".cache" / "smollm2-135m-instruct"  # its config.json: 30 layers, hidden size 576
HIDDEN, N_LAYERS = 576, 30


def make(*overrides: str, **sets):
    return config.make("progress=false", *overrides, **sets)


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg.strip() and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


def no_results(run: Path) -> None:
    """A refused run leaves no folder, or one without parts and without a merged table."""
    assert not (run / "results.parquet").exists()
    assert not (run / "parts").is_dir() or not any((run / "parts").iterdir())


@pytest.fixture
def no_weights(monkeypatch):
    """Reading weights fails the test: every case must be refused before loading."""

    def boom(*args, **kwargs):
        raise AssertionError("model weights were about to be read")

    import transformers

    monkeypatch.setattr("steersweep.model.loading.load_model", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", boom)
    for k in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def refused(cfg, match: str, error=USER_ERRORS) -> str:
    """Run the sweep as the CLI does; it must raise a user error matching `match`, leaving no results."""
    from steersweep.pipeline.sweep import run_sweep

    with pytest.raises(error) as ei:
        run_sweep(cfg)
    msg = one_line(ei.value)
    assert re.search(match, msg), msg
    no_results(Path(cfg.run_dir))
    return msg


# ---------------------------------------------------------------------------------------------
# Files the cases use


def vectors_file(path: Path, layers=(10, 14, 18), width=HIDDEN, fill=None) -> Path:
    vecs = {layer: torch.randn(width) for layer in layers}
    if fill is not None:
        for v in vecs.values():
            v[3] = fill
    return save(VectorSet(vecs, "sentiment"), path)


def truncated_safetensors(path: Path) -> Path:
    vectors_file(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


class _RunsCode:
    """Unpickling this runs a shell command: weights_only=True must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pt_with_code(path: Path) -> Path:
    torch.save({"blocks.10.hook_resid_post": _RunsCode(path.with_name("code-ran"))}, path)
    return path


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


PROMPT = '{"id": "p%d", "prompt": "Tell me about the sea."}'


# ---------------------------------------------------------------------------------------------
# 1. Config values (validate_static)

STATIC = [
    # (override(s), stable part of the message)
    (["steering.layers=[]"], r"^steering\.layers is empty: give at least one layer"),
    (["steering.alphas=[]"], r"^steering\.alphas is empty: give at least one alpha"),
    (["steering.alphas=[0,nan]"], r"^steering\.alphas contains nan: alphas must be finite numbers"),
    (["steering.layers=[10,10]"], r"^steering\.layers=\[10, 10\] repeats a layer: list each layer once"),
    (["steering.alphas=[1,1]"], r"^steering\.alphas=\[1\.0, 1\.0\] repeats an alpha: list each alpha once"),
    (["steering.positions=middle"], r"^steering\.positions=middle: use all, prompt, generated or from:K"),
    (["steering.mode=subtract"], r"^steering\.mode=subtract: use one of add, ablate, ablate_add, norm_preserving"),
    (["vectors.method=ica"], r"^vectors\.method=ica: use one of mean_diff, pca_diff, pca_center, logistic"),
    (["steering.samples=0"], r"^steering\.samples=0 must be >= 1"),
    (["steering.samples=3"], r"^steering\.samples=3 with greedy decoding .*: set generation\.do_sample=true"),
    (["generation.max_new_tokens=0"], r"^generation\.max_new_tokens=0 must be > 0"),
    (["generation.max_new_tokens=-5"], r"^generation\.max_new_tokens=-5 must be > 0"),
    (["generation=sampled", "generation.temperature=0"], r"^generation\.temperature=0\.0 must be > 0"),
    (["generation=sampled", "generation.temperature=-1"], r"^generation\.temperature=-1\.0 must be > 0"),
    (["generation=sampled", "generation.top_p=0"], r"^generation\.top_p=0\.0 must be in \(0, 1\]"),
    (["generation=sampled", "generation.top_p=1.5"], r"^generation\.top_p=1\.5 must be in \(0, 1\]"),
    (["generation.chat_template=yes"], r"^generation\.chat_template=yes: use auto, on or off"),
    (["memory.gpu_fraction=0"], r"^memory\.gpu_fraction=0\.0 must be in \(0, 1\], e\.g\. 0\.9"),
    (["memory.gpu_fraction=1.5"], r"^memory\.gpu_fraction=1\.5 must be in \(0, 1\], e\.g\. 0\.9"),
    (
        ["memory.offload_state_dict=true"],
        r"^memory\.offload_state_dict=true is refused: it makes transformers stage the whole state dict through "
        r"CPU and disk while loading, which stalls or hangs 70B loads; remove it: device_map=auto with max_memory "
        r"already places the weights$",
    ),
    (["memory.disk_offload=true"], r"^memory\.disk_offload=true needs memory\.offload_folder="),
    (["memory.cpu=12Gb"], r"^memory\.cpu: cannot read size '12Gb': write it like 80GiB"),
    (["memory.cpu=lots"], r"^memory\.cpu: cannot read size 'lots': write it like 80GiB"),
    (["model.dtype=float8"], r"^model\.dtype=float8 is unknown: use one of"),
    (["model.device_map=everywhere"], r"^model\.device_map=everywhere is unknown: use auto"),
    (["vectors.source=file"], r"^vectors\.source=file needs vectors\.path="),
    (["eval.metrics=[bleu]"], r"^eval\.metrics has unknown \['bleu'\]: choose from"),
    (["task=train"], r"^task=train is unknown: use one of run, plan"),
    (["prompts.limit=0"], r"^prompts\.limit=0 must be >= 1 \(or null"),
    (["shard_count=2", "shard_index=2"], r"^shard_index=2 must be in \[0, shard_count=2\)"),
    (["shard_count=0"], r"^shard_count=0: use a number >= 1, auto \(the Slurm array task\), or null"),
    (["shard_index=1"], r"^shard_index=1 needs shard_count=<number of shards>"),
]


@pytest.mark.parametrize("overrides, match", STATIC, ids=[" ".join(o) for o, _ in STATIC])
def test_config_value_refused(overrides, match, tmp_path, no_weights):
    refused(make(*overrides, run_dir=str(tmp_path / "run")), match, ConfigError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="quantization is allowed where CUDA is")
def test_quantization_without_gpu_refused(tmp_path, no_weights):
    refused(make("model.quantization=8bit", run_dir=str(tmp_path / "run")), r"set model\.quantization=null on CPU")


# ---------------------------------------------------------------------------------------------
# 2. Types: Hydra refuses them when composing (typed schema); API users' untyped configs are checked too

TYPED = [
    ("steering.alphas=[a,b]", "steering.alphas"),
    ("generation.max_new_tokens=many", "generation.max_new_tokens"),
    ("generation.do_sample=maybe", "generation.do_sample"),
    ("steering.alpah=[1]", "alpah"),
]


@pytest.mark.parametrize("override, key", TYPED, ids=[o for o, _ in TYPED])
def test_wrong_type_fails_at_compose(override, key):
    with pytest.raises(ConfigCompositionException) as ei:
        make(override)
    assert (
        key in str(ei.value).splitlines()[0]
    )  # Hydra's own message, e.g. "Error merging override steering.alphas=[a,b]"


def test_cli_wrong_type_is_one_error_line(tmp_path):
    r = _cli(["steering.alphas=[a,b]", f"run_dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode != 0 and "steering.alphas" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def cli_error(capsys, *args: str) -> str:
    from steersweep.pipeline.cli import precheck

    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        precheck(list(args), CONF)
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0].removeprefix("error: ")


def test_key_of_another_group_names_that_group_and_its_refusal(capsys):
    msg = cli_error(capsys, "model.offload_state_dict=true")
    assert msg == (
        "Could not override 'model.offload_state_dict'. Key 'offload_state_dict' not in 'ModelConfig': "
        "it is a memory key, and memory.offload_state_dict=true is refused: it makes transformers stage the whole "
        "state dict through CPU and disk while loading, which stalls or hangs 70B loads; remove it: "
        "device_map=auto with max_memory already places the weights"
    )
    msg = cli_error(capsys, "model.gpu_fraction=0.8")
    assert msg == (
        "Could not override 'model.gpu_fraction'. Key 'gpu_fraction' not in 'ModelConfig': "
        "it is a memory key: write memory.gpu_fraction=0.8"
    )


@pytest.mark.parametrize(
    "value, want",
    [
        (
            "0,abc",
            "-m steering.alphas=0,abc: 'abc' is not a number, and a comma list after -m makes one job per value "
            "while steering.alphas takes a list: write e.g. steering.alphas=[0,2] (one job, every value) or "
            "'steering.alphas=[0],[2]' (a job per value)",
        ),
        (
            "0,4",
            "-m steering.alphas=0,4: a comma list after -m makes one job per value while steering.alphas takes "
            "a list: write steering.alphas=[0,4] (one job, every value) or 'steering.alphas=[0],[4]' (a job per value)",
        ),
        (
            "1,x,y",
            "-m steering.alphas=1,x,y: 'x', 'y' are not numbers, and a comma list after -m makes one job per value "
            "while steering.alphas takes a list: write e.g. steering.alphas=[0,2] (one job, every value) or "
            "'steering.alphas=[0],[2]' (a job per value)",
        ),
    ],
)
def test_multirun_comma_list_of_a_list_key_names_its_values(value, want, capsys):
    assert cli_error(capsys, "-m", "experiment=quick", f"steering.alphas={value}") == want


# The "Wrong types" table of docs/bad-inputs.md: each documented command-line message, as printed.
CLI_TYPED = [
    (["steering.alphas=[a,b]"], "steering.alphas=[a,b]: steering.alphas takes numbers, not 'a': write e.g. steering.alphas=[0,2]"),
    (["steering.alphas=2"], "steering.alphas=2: steering.alphas takes a list: write steering.alphas=[2]"),
    (["generation.max_new_tokens=many"], "generation.max_new_tokens=many: Value 'many' of type 'str' could not be converted to Integer"),
    (["generation.do_sample=maybe"], "generation.do_sample=maybe: Value 'maybe' is not a valid bool (type str)"),
    (["steering.alpah=[1]"], "Could not override 'steering.alpah'. Key 'alpah' not in 'SteeringConfig'; valid keys: layers, alphas,"),
    (["model.offload_state_dict=true"], "Could not override 'model.offload_state_dict'. Key 'offload_state_dict' not in 'ModelConfig': it is a memory key, and memory.offload_state_dict=true is refused: "),
    (["model.run_dir=x"], "Could not override 'model.run_dir'. Key 'run_dir' not in 'ModelConfig': it is a top-level key: write run_dir=x"),
    (["-m", "steering.alphas=0,abc"], "-m steering.alphas=0,abc: 'abc' is not a number, and a comma list after -m makes one job per value while steering.alphas takes a list: write e.g. steering.alphas=[0,2] (one job, every value) or 'steering.alphas=[0],[2]' (a job per value)"),
    (["model=llama9000"], "In 'config': Could not find 'model/llama9000'; available: llama70b,"),
]  # fmt: skip


@pytest.mark.parametrize("args, want", CLI_TYPED, ids=[a[-1] for a, _ in CLI_TYPED])
def test_cli_type_messages_are_the_documented_ones(args, want, capsys):
    assert cli_error(capsys, *args).startswith(want)
    doc = (ROOT / "docs" / "bad-inputs.md").read_text()
    assert f"`{want}" in doc, f"docs/bad-inputs.md does not show: {want}"


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("steering.alphas", ["a", 1.0], r"^steering\.alphas contains 'a' \(str\): alphas are numbers"),
        ("steering.layers", [10.5], r"^steering\.layers takes whole numbers, not 10\.5: write steering\.layers=\[10\]"),
        ("steering.layers", ["ten"], r"^steering\.layers contains 'ten' \(str\): use layer numbers \(10\), sets"),
        ("steering.layers", [[10, 10]], r"^steering\.layers set \[10, 10\] repeats a layer"),
        ("steering.layers", [10, [10]], r"^steering\.layers=\[10, \[10\]\] repeats a layer"),
        ("steering.mode", ["add", "rotate"], r"^steering\.mode=rotate: use one of add, ablate"),
        ("vectors.method", [], r"^vectors\.method is empty"),
        ("vectors.concept", ["../../etc"], r"^vectors\.concept='\.\./\.\./etc': use letters, digits"),
        (
            "vectors.concept",
            ["a", "b"],
            r"^vectors\.concept lists 2 concept\(s\) but vectors\.dataset gives 1: give one per",
        ),
    ],
    ids=[
        "alpha-str",
        "layer-float",
        "layer-str",
        "layer-set-repeat",
        "layer-set-dup",
        "mode-list",
        "method-empty",
        "concept-path",
        "concept-count",
    ],
)
def test_wrong_type_in_untyped_config_refused(key, value, match):
    cfg = OmegaConf.create(OmegaConf.to_container(make(), resolve=True))  # no schema: as an API user builds it
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError) as ei:
        validate_static(cfg)
    assert re.search(match, one_line(ei.value))


# ---------------------------------------------------------------------------------------------
# 3. The model: checked against its config.json and tokenizer files, never its weights


def model_folder(tmp_path: Path, chat_template: bool = True, weights: bool = True, tokenizer: bool = True) -> Path:
    """A checkpoint folder with the embedded model's config and tokenizer; weights as an empty stub."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json") if tokenizer else ("config.json",):
        shutil.copy(EMBEDDED / name, d / name)
    if chat_template:
        shutil.copy(EMBEDDED / "chat_template.jinja", d / "chat_template.jinja")
    if weights:
        (d / "model.safetensors").write_bytes(b"")  # never opened: validation reads no weights
    return d


def test_model_folder_without_tokenizer(tmp_path, no_weights):
    cfg = make(run_dir=str(tmp_path / "run"), model__path=str(model_folder(tmp_path, tokenizer=False)))
    refused(cfg, r"^model\.path .* has weights but no tokenizer files .*: copy the tokenizer files")
    assert not (tmp_path / "run").exists()  # no empty run folder left behind


def test_layer_out_of_range(tmp_path, no_weights):
    cfg = make("steering.layers=[10,30]", run_dir=str(tmp_path / "run"))
    refused(cfg, r"^steering\.layers \[30\] out of range: smollm2_135m has 30 layers \(0\.\.29\): change steering")


def test_negative_layer(tmp_path, no_weights):
    refused(make("steering.layers=[-1]", run_dir=str(tmp_path / "run")), r"^steering\.layers \[-1\] out of range")


def test_nonexistent_model_path(tmp_path, no_weights):
    cfg = make(run_dir=str(tmp_path / "run"), model__path=str(tmp_path / "no-such-model"))
    refused(cfg, r"^model path '.*no-such-model' is not a folder with a config\.json: set model\.path")


def test_model_folder_without_config(tmp_path, no_weights):
    (tmp_path / "empty").mkdir()
    cfg = make(run_dir=str(tmp_path / "run"), model__path=str(tmp_path / "empty"))
    refused(cfg, r"^model\.path .*/empty has no config\.json: point model\.path at a checkpoint folder")


def test_model_folder_without_weights(tmp_path, no_weights):
    cfg = make(run_dir=str(tmp_path / "run"), model__path=str(model_folder(tmp_path, weights=False)))
    refused(cfg, r"^model\.path .* has a config\.json but no weight files .*: point model\.path at the complete")


def test_layer_list_not_found(tmp_path, no_weights):
    cfg = make("model.layers_path=model.blocks", run_dir=str(tmp_path / "run"))
    refused(cfg, r"^model LlamaForCausalLM has no attribute path 'model\.blocks': fix model\.layers_path")


def test_layer_list_not_found_by_autodetection():
    """An architecture whose layer list is in none of the known places (the hook-side check)."""
    from steersweep.core.errors import LayerLookupError
    from steersweep.hooks.layers import get_layers

    with pytest.raises(LayerLookupError) as ei:
        get_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert re.search(r"cannot find the decoder layers of Sequential .*: set model\.layers_path=", one_line(ei.value))


def test_chat_template_on_without_template(tmp_path, no_weights):
    ckpt = model_folder(tmp_path, chat_template=False)
    cfg = make("generation.chat_template=on", run_dir=str(tmp_path / "run"), model__path=str(ckpt))
    refused(cfg, r"^generation\.chat_template=on but the tokenizer has no chat template: set it to auto or off")


def test_chat_template_on_without_template_after_load():
    """The after-load check (hub checkpoints, where the pre-load one cannot read the tokenizer)."""
    from steersweep.core.errors import PromptError
    from steersweep.inputs.encoding import use_chat_template

    class NoTemplate:
        chat_template = None

    with pytest.raises(PromptError) as ei:
        use_chat_template(NoTemplate(), "on")
    assert "set it to auto or off" in one_line(ei.value)


def test_prompt_error_is_a_user_error():
    from steersweep.core.errors import PromptError

    assert issubclass(PromptError, USER_ERRORS)


def test_prompt_longer_than_context(tmp_path, tokenizer):
    """Needs the tokenizer, so it runs after loading: generate_batches on the tiny random Llama."""
    from helpers.models import tiny_llama

    from steersweep.pipeline.sweep import generate_batches
    from steersweep.runs.grid import Batch, Cell

    model = tiny_llama()  # max_position_embeddings=256
    folder = RunFolder(tmp_path / "run")
    folder.create()
    inputs = {"prompts": [{"id": "long", "prompt": "word " * 400}, {"id": "short", "prompt": "Hi"}]}
    with pytest.raises(ConfigError) as ei:
        cell = Cell("c", 1, 1.0, "long", "word " * 400, 0, 0)
        generate_batches(make(), model, tokenizer, None, inputs, [Batch(0, (cell,))], folder, "w")
    msg = one_line(ei.value)
    assert re.search(r"^prompt\(s\) \['long'\] plus max_new_tokens=32 exceed the model's context of 256 tokens: ", msg)
    assert "shorten them or lower generation.max_new_tokens" in msg
    no_results(folder.path)


def test_unreachable_hub_id_offline(tmp_path, no_weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make(run_dir=str(tmp_path / "run"), model__path="nobody-here/no-such-model")
    refused(
        cfg, r"^model 'nobody-here/no-such-model' is neither a local folder nor reachable on the hub: .*set model\.path"
    )


# ---------------------------------------------------------------------------------------------
# 4. Vector files (vectors=file)

VECTOR_FILES = [
    # (name, builder(tmp) -> path, stable part of the message)
    (
        "missing",
        lambda d: d / "nope.safetensors",
        r"^vector file not found: .* \(set vectors\.path to an existing file\)$",
    ),
    (
        "width",
        lambda d: vectors_file(d / "v.safetensors", width=32),
        r"has shape \(32,\) but the model's hidden size is 576: use vectors computed for this model",
    ),
    (
        "nan",
        lambda d: vectors_file(d / "v.safetensors", fill=float("nan")),
        r"^vector for layer 10 contains NaN or Inf: recompute or fix the file",
    ),
    (
        "inf",
        lambda d: vectors_file(d / "v.safetensors", fill=float("inf")),
        r"^vector for layer 10 contains NaN or Inf",
    ),
    (
        "missing-layer",
        lambda d: vectors_file(d / "v.safetensors", layers=(12, 14)),
        r"^no vector for layer\(s\) \[10, 18\]; the file has layers \[12, 14\]: change steering\.layers or use vectors\.source=compute$",
    ),
    (
        "layer-beyond-model",
        lambda d: vectors_file(d / "v.safetensors", layers=(10, 40)),
        r"^vector for layer 40 but the model has 30 layers \(0\.\.29\)",
    ),
    (
        "truncated",
        lambda d: truncated_safetensors(d / "v.safetensors"),
        r"^cannot read safetensors file .*; re-save or re-download it",
    ),
    ("not-safetensors", lambda d: _write(d / "v.safetensors", b"hello"), r"^cannot read safetensors file .*; re-save"),
    ("empty", lambda d: _save_raw(d / "v.safetensors", {}), r"contains no vectors"),
    (
        "bad-key",
        lambda d: _save_raw(d / "v.safetensors", {"mlp.10": torch.zeros(HIDDEN)}),
        r"^unrecognised vector key 'mlp\.10': expected layer\.N",
    ),
    (
        "pt-with-code",
        lambda d: pt_with_code(d / "v.pt"),
        r"^refused to load .*v\.pt with weights_only=True \(.*\); save plain tensors in a dict or use safetensors$",
    ),
    (
        "pt-not-dict",
        lambda d: _torch_save(d / "v.pt", [torch.zeros(HIDDEN)]),
        r"holds a list; expected a dict of hook name -> tensor",
    ),
    (
        "suffix",
        lambda d: _write(d / "v.npy", b"x"),
        r"^unsupported vector file type '\.npy': use \.safetensors, \.pt or \.gguf",
    ),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save_raw(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


def _torch_save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("build, match", [c[1:] for c in VECTOR_FILES], ids=[c[0] for c in VECTOR_FILES])
def test_vector_file_refused(build, match, tmp_path, no_weights):
    path = build(tmp_path)
    refused(make("vectors=file", run_dir=str(tmp_path / "run"), vectors__path=str(path)), match)
    assert not (tmp_path / "code-ran").exists()  # the .pt payload never ran


# ---------------------------------------------------------------------------------------------
# 5. Datasets (prompts, contrastive pairs, behavior items, word lists)

CAA_ITEM = (
    '{"question": "Do you like rain?\\n\\nChoices:\\n (A) Yes\\n (B) No", '
    '"answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}'
)

DATASETS = [
    # (name, config key, content, stable part of the message); content: JSONL lines, raw text for
    # data.jsonl (data.json for word lists), or (file name, text or bytes)
    (
        "malformed-line",
        "prompts.dataset",
        [PROMPT % 1, PROMPT % 2, '{"id": "p3", "prompt": "oops"', PROMPT % 4],
        r":3: not valid JSON \(.*\): fix or remove that line$",
    ),
    (
        "unterminated-string",
        "prompts.dataset",
        [PROMPT % 1, '{"id": "p2", "prompt": "oops}'],
        r":2: not valid JSON \(Unterminated string starting at: column 24\): fix or remove that line$",
    ),
    (
        "missing-key",
        "prompts.dataset",
        [PROMPT % 1, '{"id": "p2", "text": "Hello"}'],
        r":2: missing key\(s\) \['prompt'\]; prompt items need \['prompt'\] \('id' optional; CAA files have "
        r"'question'\): add the missing key\(s\)$",
    ),
    (
        "not-an-object",
        "prompts.dataset",
        [PROMPT % 1, '["p2", "Hello"]'],
        r":2: expected a JSON object, got list: write one \{\.\.\.\} object per line$",
    ),
    (
        "empty",
        "prompts.dataset",
        ["", "  "],
        r" has no rows: add at least one item \(a JSON object per line or in a JSON array, each with \['prompt'\]\)$",
    ),
    (
        "duplicate-ids",
        "prompts.dataset",
        [PROMPT % 1, PROMPT % 2, PROMPT % 1],
        r"data\.jsonl:3: id 'p1' is already used at line 1; ids must be unique: give each item its own id",
    ),
    (
        "not-utf8",
        "prompts.dataset",
        ("prompts.txt", "Caf\xe9 au lait?\n".encode("latin-1")),
        r"prompts\.txt: not UTF-8 text \(byte 3: .*\): save it as UTF-8$",
    ),
    (
        "json-array-broken",
        "prompts.dataset",
        ("prompts.json", '[\n  {"question": "Hi?"},\n  {"question": }\n]\n'),
        r"prompts\.json: not valid JSON \(Expecting value: line 3 column 16\): fix it; expected a JSON array of "
        r"objects, or one JSON object per line$",
    ),
    (
        "pairs-missing-negative",
        "vectors.dataset",
        ['{"positive": "I love it"}'],
        r":1: missing key\(s\) \['negative'\]; contrastive pairs need \['positive', 'negative'\]",
    ),
    (
        "pairs-plain-text",
        "vectors.dataset",
        ("pairs.txt", "I love it\n"),
        r"pairs\.txt: plain text gives prompts only \(one per line\): write contrastive pairs as JSONL or a JSON array",
    ),
    (
        "caa-missing-answer",
        "vectors.dataset",
        ("caa.json", f"[{CAA_ITEM}, {{\"question\": \"Do you like snow?\\n(A) Yes\\n(B) No\", "
         "\"answer_matching_behavior\": \"(B)\"}]"),
        r"caa\.json\[1\]: missing key\(s\) \['answer_not_matching_behavior'\]; CAA A/B items need ",
    ),
    (
        "caa-no-options",
        "vectors.dataset",
        ("caa.json", '[{"question": "Do you like rain?", "answer_matching_behavior": "(A)", '
         '"answer_not_matching_behavior": "(B)"}]'),
        r"caa\.json\[0\]: cannot find the options '\(A\) \.\.\.' and '\(B\) \.\.\.' in 'question'",
    ),
    (
        "behavior-missing-key",
        "eval.behavior_dataset",
        ['{"prefix": "The film was", "positive": " great"}'],
        r":1: missing key\(s\) \['negative'\]; continuation behaviour items need \['prefix', 'positive', 'negative'\]",
    ),
    (
        "behavior-caa-as-continuation",
        "eval.behavior_dataset",
        ("caa.json", f"[{CAA_ITEM}]"),
        r"caa\.json: holds CAA A/B items but eval\.behavior_format=continuation: set eval\.behavior_format=ab$",
    ),
    (
        "word-list-not-json",
        "eval.word_lists",
        "positive: [good]\n",
        r": not valid JSON \(Expecting value: line 1 column 1\): fix it; expected \{\"name\": \[words\.\.\.\]\}$",
    ),
    (
        "word-list-wrong-shape",
        "eval.word_lists",
        '["good", "bad"]',
        r": expected \{\"name\": \[words\.\.\.\]\}: make it one object of word lists$",
    ),
]  # fmt: skip


@pytest.mark.parametrize("key, content, match", [c[1:] for c in DATASETS], ids=[c[0] for c in DATASETS])
def test_dataset_refused(key, content, match, tmp_path, no_weights):
    path = tmp_path / ("data.json" if key == "eval.word_lists" else "data.jsonl")
    if isinstance(content, tuple):
        path, content = tmp_path / content[0], content[1]
    if isinstance(content, list):
        jsonl(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    msg = refused(make(run_dir=str(tmp_path / "run"), **{key.replace(".", "__"): str(path)}), match)
    assert str(path) in msg


def test_unknown_dataset_name(tmp_path, no_weights):
    cfg = make("prompts.dataset=no_such_prompts", run_dir=str(tmp_path / "run"))
    refused(cfg, r"^dataset 'no_such_prompts' not found: give a file path or one of .*prompts_default")


# ---------------------------------------------------------------------------------------------
# 6. The environment: Slurm array variables, the results folder, the disk


@pytest.mark.parametrize(
    "env, match",
    [
        ({"SLURM_ARRAY_TASK_COUNT": "four", "SLURM_ARRAY_TASK_ID": "0"}, r"^Slurm array environment is not integers"),
        ({"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1"}, r"^Slurm array task 5 \(min 1\) is not in a contiguous array of 3 tasks: submit --array=0-2"),
    ],
    ids=["not-integers", "sparse-array"],
)  # fmt: skip
def test_slurm_array_env_refused(env, match, tmp_path, no_weights, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    msg = refused(make("shard_count=auto", run_dir=str(tmp_path / "run")), match, ConfigError)
    assert "set shard_index and shard_count" in msg


def test_slurm_array_env_ignored_without_shard_count_auto(tmp_path, monkeypatch):
    """A job of a Hydra multirun sees the sweep's array variables: it must not shard by them."""
    from steersweep.runs.launch import shard_of

    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert shard_of(make(run_dir=str(tmp_path / "run"))) == (0, 1)
    assert shard_of(make("shard_count=auto", run_dir=str(tmp_path / "run"))) == (1, 2)


def test_run_dir_under_a_regular_file(tmp_path, no_weights):
    (tmp_path / "file").write_text("not a folder")
    cfg = make(run_dir=str(tmp_path / "file" / "run"))
    refused(
        cfg, r"^results folder .*/file/run cannot be made: .*/file is a file: choose another run_dir or results_root$"
    )


def test_run_dir_that_is_a_regular_file(tmp_path, no_weights):
    (tmp_path / "file").write_text("not a folder")
    msg = refused(make(run_dir=str(tmp_path / "file")), r"^results folder .*/file is a file, not a folder: ")
    assert msg.endswith(": choose another run_dir or results_root") and "Not a directory" not in msg
    assert (tmp_path / "file").read_text() == "not a folder"


def test_results_root_under_a_regular_file(tmp_path, no_weights):
    (tmp_path / "file").write_text("not a folder")
    cfg = make("run_name=x", run_dir=None, results_root=str(tmp_path / "file" / "results"))
    with pytest.raises(ConfigError) as ei:
        from steersweep.pipeline.sweep import run_sweep

        run_sweep(cfg)
    assert re.search(
        r"^results folder .*/file/results/\S+ cannot be made: .*/file is a file: choose another", one_line(ei.value)
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_results_root_read_only(tmp_path, no_weights):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(make(run_dir=str(ro / "run")), r"is not writable \(Permission denied\): choose another run_dir")
    finally:
        ro.chmod(0o700)


def test_resume_with_a_different_config_refused(tmp_path, no_weights):
    from steersweep.pipeline.sweep import prepare

    run = tmp_path / "run"
    prepare(make("steering.positions=generated", "generation.max_new_tokens=8", run_dir=str(run)))  # claims it
    before = (run / "plan.json").read_text()
    msg = refused(
        make(run_dir=str(run)),
        r"^run folder .* holds the plan of another config \(differs in generation\.max_new_tokens, "
        r"steering\.positions\): ",
    )
    assert "drop run_dir/run_name to get a folder of its own, or restore those settings" in msg
    assert (run / "plan.json").read_text() == before


def test_disk_full_during_part_write(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "run")
    folder.create()
    real = pq.write_table

    def half_then_enospc(table, where, **kwargs):
        real(table, where, **kwargs)
        with open(where, "r+b") as f:
            f.truncate(os.path.getsize(where) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    monkeypatch.setattr(pq, "write_table", half_then_enospc)
    row = {"run_id": "r", "cell_id": "c1", "model": "m", "layer": 1, "alpha": 0.0, "prompt_id": "p", "sample": 0}
    with pytest.raises(ResultsError) as ei:
        folder.write_part([row], "w0")
    msg = one_line(ei.value)
    assert re.search(r"^cannot write a part file in .*parts \(No space left on device\): free disk space", msg)
    assert ei.value.__cause__.errno == errno.ENOSPC
    assert list(folder.parts.iterdir()) == []  # no tmp file, no part
    assert folder.done_cells() == set()


# ---------------------------------------------------------------------------------------------
# 7. The real command line (a representative subset; each is ~5 s of start-up, no weights)


def _cli_cases():
    def nan_vectors(d):
        return ["vectors=file", f"vectors.path={vectors_file(d / 'v.safetensors', fill=float('nan'))}"]

    def pt_code(d):
        return ["vectors=file", f"vectors.path={pt_with_code(d / 'v.pt')}"]

    def malformed(d):
        return [f"prompts.dataset={jsonl(d / 'p.jsonl', [PROMPT % 1, '{oops', PROMPT % 3])}"]

    def under_file(d):
        (d / "file").write_text("x")
        return [f"run_dir={d / 'file' / 'run'}"]

    def resume(d):
        from steersweep.pipeline.sweep import prepare

        prepare(make("generation.max_new_tokens=8", run_dir=str(d / "run")))
        return []

    return [
        ("layer-out-of-range", lambda d: ["steering.layers=[99]"], r"steering\.layers \[99\] out of range: .*: change steering\.layers"),
        ("max-new-tokens", lambda d: ["generation.max_new_tokens=0"], r"generation\.max_new_tokens=0 must be > 0"),
        ("greedy-samples", lambda d: ["steering.samples=3"], r"set generation\.do_sample=true or steering\.samples=1"),
        ("nan-vector", nan_vectors, r"contains NaN or Inf: recompute or fix the file"),
        ("pt-with-code", pt_code, r"with weights_only=True \(.*\); save plain tensors in a dict or use safetensors"),
        ("malformed-jsonl", malformed, r"p\.jsonl:2: not valid JSON .*: fix or remove that line"),
        ("model-path", lambda d: [f"model.path={d / 'no-model'}"], r"model path .*no-model.* is not a folder with a config\.json"),
        ("unwritable-run-dir", under_file, r"/file is a file: choose another run_dir"),
        ("resume-other-config", resume, r"holds the plan of another config \(differs in generation\.max_new_tokens\): drop run_dir"),
    ]  # fmt: skip


CLI = _cli_cases()


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "WORLD_SIZE"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "run_experiment.py", *args, "progress=false", f"hydra.run.dir={tmp_path / 'hydra'}",
         f"results_root={tmp_path / 'results'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("setup, match", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_refuses(setup, match, tmp_path):
    args = setup(tmp_path)
    given = [a[len("run_dir=") :] for a in args if a.startswith("run_dir=")]
    run = Path(given[0]) if given else tmp_path / "run"
    r = _cli(args if given else [*args, f"run_dir={run}"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert re.search(match, errors[0]), errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "code-ran").exists()
    no_results(run)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.parquet"))
    # a refused job leaves no log in the folder it was refused from (a resume's holds another job's plan)
    assert not (run / "logs").exists(), list((run / "logs").iterdir())
    assert "log: " not in r.stdout + r.stderr


def test_corpus_size():
    """At least 30 bad inputs are kept; keep the docs table in step with this file."""
    n = len(STATIC) + len(TYPED) + len(VECTOR_FILES) + len(DATASETS)
    assert n >= 30
    doc = (ROOT / "docs" / "bad-inputs.md").read_text()
    for overrides, _ in STATIC:
        assert overrides[-1] in doc, f"{overrides[-1]} missing from docs/bad-inputs.md"
