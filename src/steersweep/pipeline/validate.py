"""Checks that run before any weight is read: each failure is one line that says what to do."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from steersweep.core import errors
from steersweep.core.config import CHAT_TEMPLATES, TASKS
from steersweep.core.errors import ConfigError, LoadError
from steersweep.core.units import parse_size
from steersweep.inputs import datasets
from steersweep.model.checkpoint import read_model_config
from steersweep.model.dtypes import DTYPES
from steersweep.scoring.metrics import METRICS

log = logging.getLogger(__name__)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_static(cfg: DictConfig) -> None:
    """Checks on the config alone (no files, no model)."""
    check(cfg.task in TASKS, f"task={cfg.task} is unknown: use one of {', '.join(TASKS)}")
    m, mem, st, gen, vec = cfg.model, cfg.memory, cfg.steering, cfg.generation, cfg.vectors
    check(
        not mem.offload_state_dict,
        "memory.offload_state_dict=true is refused: it makes transformers stage the whole state dict through CPU "
        "and disk while loading, which stalls or hangs 70B loads; remove it: device_map=auto with max_memory "
        "already places the weights",
    )
    check(0 < mem.gpu_fraction <= 1, f"memory.gpu_fraction={mem.gpu_fraction} must be in (0, 1], e.g. 0.9")
    check(
        not mem.disk_offload or bool(mem.offload_folder),
        "memory.disk_offload=true needs memory.offload_folder=<a folder on fast local disk>",
    )
    if str(mem.cpu).lower() != "auto":
        try:
            parse_size(mem.cpu)
        except LoadError as e:
            raise ConfigError(f"memory.cpu: {e}") from None
    check(m.dtype in DTYPES, f"model.dtype={m.dtype} is unknown: use one of {', '.join(DTYPES)}")
    check(
        m.device_map in ("auto", "balanced", "balanced_low_0", "sequential"),
        f"model.device_map={m.device_map} is unknown: use auto, balanced, balanced_low_0 or sequential",
    )
    check(m.quantization in (None, "8bit", "4bit"), f"model.quantization={m.quantization}: use null, 8bit or 4bit")
    if cfg.task == "run":
        check(
            m.quantization is None or torch.cuda.is_available(),
            "model.quantization needs a CUDA GPU (bitsandbytes); set model.quantization=null on CPU",
        )
    _check_layer_spec(st.layers)
    check(len(st.alphas) > 0, "steering.alphas is empty: give at least one alpha, e.g. 'steering.alphas=[0,4]'")
    for a in st.alphas:
        check(
            isinstance(a, (int, float)) and not isinstance(a, bool),
            f"steering.alphas contains {a!r} ({type(a).__name__}): alphas are numbers, e.g. [0,4]",
        )
        check(math.isfinite(a), f"steering.alphas contains {a}: alphas must be finite numbers")
    check(
        len(set(st.alphas)) == len(st.alphas),
        f"steering.alphas={list(st.alphas)} repeats an alpha: list each alpha once",
    )
    # steering methods and modes (issue 13)
    from steersweep.hooks.rows import MODES, POSITIONS_HELP, parse_positions
    from steersweep.vectors.directions import METHODS

    check(_parses(parse_positions, st.positions), f"steering.positions={st.positions}: {POSITIONS_HELP}")
    from steersweep.runs.grid import as_list, concepts

    for key, values, known in (("steering.mode", st.mode, MODES), ("vectors.method", vec.method, METHODS)):
        values = as_list(values)
        check(len(values) > 0, f"{key} is empty: give one value or a list, e.g. {key}={known[0]}")
        for v in values:
            check(isinstance(v, str) and v in known, f"{key}={v}: use one of {', '.join(known)} (or a list of them)")
        check(len(set(values)) == len(values), f"{key}={values} repeats a value: list each once")
    try:
        names = [c for c, _ in concepts(cfg.vectors)]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check(len(set(names)) == len(names), f"vectors.concept={names} repeats a concept: list each once")
    for name in names:  # concept names become folder and file names
        check(
            re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", name) is not None,
            f"vectors.concept={name!r}: use letters, digits and _ . + - (it names folders and files)",
        )
    check(
        vec.source == "compute" or len(as_list(vec.method)) == 1,
        f"vectors.method={list(as_list(vec.method))} with vectors.source=file: a file holds one set of vectors; "
        "use vectors.source=compute to compare methods",
    )
    check(vec.logistic_c > 0, f"vectors.logistic_c={vec.logistic_c} must be > 0")
    check(st.samples >= 1, f"steering.samples={st.samples} must be >= 1")
    check(
        st.samples == 1 or gen.do_sample,
        f"steering.samples={st.samples} with greedy decoding repeats identical completions: "
        "set generation.do_sample=true or steering.samples=1",
    )
    check(gen.max_new_tokens > 0, f"generation.max_new_tokens={gen.max_new_tokens} must be > 0")
    check(gen.temperature > 0, f"generation.temperature={gen.temperature} must be > 0")
    check(0 < gen.top_p <= 1, f"generation.top_p={gen.top_p} must be in (0, 1]")
    check(gen.batch_size >= 0, f"generation.batch_size={gen.batch_size}: use 0 (automatic) or a positive number")
    check(
        gen.chat_template in CHAT_TEMPLATES,
        f"generation.chat_template={gen.chat_template}: use {', '.join(CHAT_TEMPLATES[:-1])} or {CHAT_TEMPLATES[-1]}",
    )
    check(vec.source in ("compute", "file"), f"vectors.source={vec.source}: use compute or file")
    check(vec.source != "file" or bool(vec.path), "vectors.source=file needs vectors.path=<.safetensors, .pt or .gguf>")
    check(vec.batch_size > 0, f"vectors.batch_size={vec.batch_size} must be > 0")
    check(
        vec.read_at in ("last", "answer", "answer_mean"),
        f"vectors.read_at={vec.read_at}: use last, answer (the A/B answer letter) or answer_mean",
    )
    check(
        cfg.prompts.limit is None or cfg.prompts.limit >= 1,
        f"prompts.limit={cfg.prompts.limit} must be >= 1 (or null for every prompt)",
    )
    unknown = [x for x in cfg.eval.metrics if x not in METRICS]
    check(not unknown, f"eval.metrics has unknown {unknown}: choose from {', '.join(METRICS)}")
    check(
        cfg.eval.behavior_format in ("continuation", "ab"),
        f"eval.behavior_format={cfg.eval.behavior_format}: use continuation or ab",
    )
    n = cfg.shard_count
    if n is not None and str(n) != "auto":
        check(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1,
            f"shard_count={n}: use a number >= 1, auto (the Slurm array task), or null (no sharding)",
        )
        check(
            cfg.shard_index is not None and 0 <= cfg.shard_index < n,
            f"shard_index={cfg.shard_index} must be in [0, shard_count={n})",
        )
    else:
        check(
            cfg.shard_index is None,
            f"shard_index={cfg.shard_index} needs shard_count=<number of shards> (with shard_count={n} it is unused)",
        )


LAYERS_HELP = (
    "use layer numbers (10), sets of them ([10,14]: one cell steers both) or all, e.g. steering.layers=[10,[10,14]]"
)


def _check_layer_spec(spec) -> None:
    """`steering.layers`: whole numbers, lists of them, or `all`; no empty list, no repeats."""
    from omegaconf import ListConfig

    from steersweep.runs.grid import set_label

    items = list(spec) if isinstance(spec, (list, ListConfig)) else [spec]
    check(len(items) > 0, "steering.layers is empty: give at least one layer, e.g. 'steering.layers=[10]'")
    labels = []
    for item in items:
        members = list(item) if isinstance(item, (list, ListConfig)) else [item]
        if isinstance(item, (list, ListConfig)):
            check(len(members) > 0, f"steering.layers contains an empty set []: {LAYERS_HELP}")
        for x in members:
            if isinstance(x, float) and not isinstance(x, bool):
                raise ConfigError(f"steering.layers takes whole numbers, not {x!r}: write steering.layers=[{int(x)}]")
            if isinstance(x, str) and x == "all" and not isinstance(item, (list, ListConfig)):
                continue
            check(
                isinstance(x, int) and not isinstance(x, bool),
                f"steering.layers contains {x!r} ({type(x).__name__}): {LAYERS_HELP}",
            )
        check(
            len(set(members)) == len(members),
            f"steering.layers set {list(members)} repeats a layer: list each layer once",
        )
        labels.append(set_label(item))
    check(
        len(set(labels)) == len(labels),
        f"steering.layers={_plain(spec)} repeats a layer: list each layer once",
    )


def _plain(v):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v


def validate_model(cfg: DictConfig, need_checkpoint: bool = True):
    """Read config.json (never weights) and check layers against it. Returns the HF config."""
    if cfg.model.path and Path(cfg.model.path).expanduser().is_dir():
        folder = Path(cfg.model.path).expanduser()
        check(
            (folder / "config.json").is_file(),
            f"model.path {folder} has no config.json: point model.path at a checkpoint folder (config.json + weights)",
        )
    try:
        hf = read_model_config(cfg.model, need_checkpoint=need_checkpoint)
    except (LoadError, OSError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    n = hf.num_hidden_layers
    if cfg.model.num_hidden_layers is not None and cfg.model.num_hidden_layers != n:
        log.warning(
            "model.num_hidden_layers=%s but the checkpoint's config.json says %s; using %s",
            cfg.model.num_hidden_layers, n, n,
        )  # fmt: skip
    from steersweep.runs.grid import layer_sets

    bad = sorted({layer for _, ls in layer_sets(cfg.steering.layers, n) for layer in ls if not 0 <= layer < n})
    check(
        not bad,
        f"steering.layers {bad} out of range: {cfg.model.name} has {n} layers (0..{n - 1}): change steering.layers",
    )
    if need_checkpoint:
        _check_weight_files(cfg)
        _check_layer_list(cfg, hf)
        if cfg.generation.chat_template == "on":
            _check_chat_template(cfg)
    return hf


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model", "tekken.json",
)  # fmt: skip
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ckpt", "*.gguf")


def _check_weight_files(cfg: DictConfig) -> None:
    """A local model.path folder must hold weight files, not only config.json (nothing is read)."""
    if not cfg.model.path:
        return
    p = Path(cfg.model.path).expanduser()
    check(
        not p.is_dir() or any(next(p.glob(g), None) for g in WEIGHT_GLOBS),
        f"model.path {p} has a config.json but no weight files (*.safetensors, *.bin): "
        "point model.path at the complete checkpoint folder",
    )
    check(
        not p.is_dir() or any((p / f).is_file() for f in TOKENIZER_FILES),
        f"model.path {p} has weights but no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...): "
        "copy the tokenizer files of this checkpoint into the folder",
    )


def _check_layer_list(cfg: DictConfig, hf) -> None:
    """Find the decoder layer list on an empty (meta-device) model, so a miss fails before loading."""
    from steersweep.core.errors import LayerLookupError
    from steersweep.hooks.layers import get_layers
    from steersweep.model.placement import empty_model

    try:
        model = empty_model(hf, cfg.model.trust_remote_code)
    except Exception as e:  # an architecture the meta build cannot handle: the loader will tell
        log.debug("skipping the layer-list check: cannot build %s on the meta device (%s)", cfg.model.name, e)
        return
    try:
        get_layers(model, cfg.model.layers_path)
    except LayerLookupError as e:
        raise ConfigError(str(e)) from None


def _check_chat_template(cfg: DictConfig) -> None:
    """generation.chat_template=on needs a tokenizer with a template; read it (no weights) to see."""
    from steersweep.model.checkpoint import resolve_model_path

    path = resolve_model_path(cfg.model)
    if not Path(path).is_dir():
        return  # a hub id: checked after loading (generation.use_chat_template)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # no usable tokenizer: the loader reports it
        log.debug("skipping the chat-template check: cannot read the tokenizer in %s (%s)", path, e)
        return
    check(
        bool(getattr(tok, "chat_template", None)),
        "generation.chat_template=on but the tokenizer has no chat template: set it to auto or off",
    )


def behavior_datasets(cfg: DictConfig) -> dict[str, str]:
    """{concept: its behaviour items}: `eval.behavior_dataset` is one name for every concept, or a
    list with one per concept (in `vectors.concept`'s order)."""
    from steersweep.runs.grid import as_list, concepts

    names = [c for c, _ in concepts(cfg.vectors)]
    given = [str(x) for x in as_list(cfg.eval.behavior_dataset)]
    if len(given) == 1:
        return dict.fromkeys(names, given[0])
    check(
        len(given) == len(names),
        f"eval.behavior_dataset lists {len(given)} datasets for {len(names)} concept(s): give one, or one per concept",
    )
    return dict(zip(names, given, strict=True))


def validate_inputs(cfg: DictConfig, hf) -> dict:
    """Load the small inputs (datasets, vector files) and check them against the model config.

    Datasets go through `data`'s adapters (our JSONL, CAA JSON, plain-text prompts; see datasets.py) into
    the internal forms: prompts {id, prompt}; pairs {id, format, positive, negative[, question]};
    behaviour items in the eval.behavior_format form."""
    from steersweep.runs.grid import concepts

    out: dict = {}
    try:
        out["prompts"] = datasets.load_prompts(cfg.prompts.dataset, cfg.prompts.limit)
        if cfg.vectors.source == "compute":  # {concept: pairs}
            out["pairs"] = {concept: datasets.load_pairs(source) for concept, source in concepts(cfg.vectors)}
        if "word_rate" in cfg.eval.metrics:
            out["word_lists"] = datasets.load_word_lists(cfg.eval.word_lists)
        if "behavior_prob" in cfg.eval.metrics:
            out["behavior_items"] = {}  # {concept: items}: one dataset per concept, or one for all
            for concept, name in behavior_datasets(cfg).items():
                items = datasets.load_behavior_items(name, cfg.eval.behavior_format)
                out["behavior_items"][concept] = items[: cfg.eval.behavior_limit] if cfg.eval.behavior_limit else items
            out["behavior_main"] = {c: datasets.set_name(name) for c, name in behavior_datasets(cfg).items()}
            out["behavior_sets"] = {}  # {set name: items}: scored at every setting too, each as its file holds it
            mains = set(out["behavior_main"].values())
            for name in cfg.eval.get("behavior_sets") or []:
                label = datasets.set_name(name)
                check(
                    label not in mains and label not in out["behavior_sets"],
                    f"eval.behavior_sets: {name} is named {label}, like another set: give each set its own file name",
                )
                items = datasets.load_behavior_items(str(name), "auto")
                out["behavior_sets"][label] = items[: cfg.eval.behavior_limit] if cfg.eval.behavior_limit else items
    except errors.DatasetError as e:
        raise ConfigError(str(e)) from None
    if cfg.vectors.source == "file":  # {concept: VectorSet}
        from steersweep.core.errors import VectorError
        from steersweep.runs.grid import Grid, concepts
        from steersweep.vectors.vectorset import load

        out["vectors"] = {}
        named = concepts(cfg.vectors)
        for concept, path in named:
            try:  # one file: its own concept name (e.g. a GGUF's); several: the names given for them
                vs = load(path, concept if len(named) > 1 else None)
                vs.validate(hf.hidden_size, hf.num_hidden_layers, Grid.of(cfg).all_layers(hf.num_hidden_layers))
            except VectorError as e:
                raise ConfigError(str(e)) from None
            out["vectors"][concept] = vs
    return out


def validate_offline(cfg: DictConfig, multirun: bool = False):
    """Every check that needs no weights and no run folder (before a -m sweep is submitted, or
    before a notebook sweep starts); returns the model's HF config.

    The checkpoint itself may live only on compute nodes, so its config.json is enough here; the
    job checks the weights when it starts.
    """
    from steersweep.runs.launch import shard_of

    validate_static(cfg)
    shard_of(cfg, multirun=multirun)
    hf = validate_model(cfg, need_checkpoint=False)
    validate_inputs(cfg, hf)
    return hf


def _parses(parse, value) -> bool:
    """True when `parse(value)` accepts it (the parser owns the grammar; the check owns the message)."""
    try:
        parse(value)
    except ValueError:
        return False
    return True
