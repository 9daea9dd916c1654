"""Typed configuration schemas, registered in Hydra's ConfigStore.

The top-level `Config` types every group, so a misspelt key or a wrong type in any YAML file or
command-line override fails when Hydra composes the config, before anything is queued or loaded.
Checks that need more than types (layer ranges from the model's config.json, vector files that
must exist...) live in `pipeline/validate.py` and also run before any weight is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, ListConfig, OmegaConf


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in run ids and results
    path: str | None = None  # hub id or local checkpoint folder; null = the embedded default model
    config_json: str | None = None  # shipped config.json for `task=plan` without the checkpoint
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32 | auto (bf16 on GPU, fp32 on CPU)
    device_map: str = "auto"  # auto | balanced | balanced_low_0 | sequential
    quantization: str | None = None  # null | 8bit | 4bit (bitsandbytes, GPU only)
    trust_remote_code: bool = False  # run code shipped with the checkpoint: only if you trust it
    revision: str | None = None  # hub revision (branch, tag or commit)
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2; null = default
    layers_path: str | None = None  # dotted path to the decoder layer list if auto-detection fails
    num_hidden_layers: int | None = None  # noted for humans; checked against config.json
    recommended_layers: list[int] = field(default_factory=list)  # the default grid's layers (steering.layers overrides)
    recommended_alphas: list[float] = field(  # the default grid's alphas for this model (steering.alphas overrides)
        default_factory=lambda: [-1.0, -0.5, 0.0, 0.5, 1.0]
    )


@dataclass
class MemoryConfig:
    gpu_fraction: float = 0.90  # share of each GPU's total memory the weights may take
    cpu: str = "auto"  # CPU spill budget: "auto" (90% of available RAM), "0", or a size like "150GiB"
    disk_offload: bool = False  # allow spilling weights to disk (slow; last resort)
    offload_folder: str | None = None  # where disk-offloaded weights go (required with disk_offload)
    offload_state_dict: bool = False  # refused: staging weights through CPU/disk stalls 70B loads
    load_timeout_s: float = 3600.0  # watchdog: dump all thread stacks and exit if loading runs longer
    batch_timeout_s: float = 0.0  # watchdog per generate batch; 0 = off
    plan_hardware: list[str] = field(  # hardware shapes `task=plan` prints device maps for
        default_factory=lambda: ["8x80GiB", "4x80GiB", "2x80GiB+256GiB"]
    )


@dataclass
class SteeringConfig:
    # decoder layers whose output is steered, one grid value per item: 10 (one layer), [10,14] (one cell
    # steering both, each with its own vector) or all (every layer: e.g. directional ablation)
    layers: Any = field(default_factory=lambda: [10])
    alphas: list[float] = field(default_factory=lambda: [0.0, 4.0])  # coefficients on the vector
    positions: str = "all"  # all | prompt (prompt only) | generated (last prompt token on) | from:K (token K on)
    # add: h + alpha v | ablate: h - (h.u)u, u = v/|v| (alpha only switches it on) | ablate_add: ablate,
    # then + alpha v | norm_preserving: h + alpha v rescaled to |h|. alpha 0 is the unsteered model in every mode.
    mode: Any = "add"  # one mode, or a list of modes: a grid axis (rows carry `mode`)
    samples: int = 1  # completions per (layer, alpha, prompt); > 1 needs generation.do_sample


@dataclass
class VectorsConfig:
    source: str = "compute"  # compute = mean difference from `dataset`; file = load `path`
    path: Any = None  # vector file: .safetensors, .pt (TransformerLens keys) or .gguf; a list with concept lists
    dataset: Any = "sentiment_pairs"  # shipped dataset name or a JSONL path with positive/negative; or a list
    # name recorded in vector ids and results, by default the dataset's (data.concept_of); a list of
    # concepts is a grid axis, each concept taking the dataset (or path) at the same place in those lists
    concept: Any = "${steersweep_concept:${vectors.dataset}}"
    position: int = -1  # token index whose residual is averaged (-1 = last token)
    read_at: str = "last"  # last (token `position`) | answer (the A/B answer letter; a text's last token) | answer_mean
    # mean_diff (CAA) | pca_diff (1st PC of pair differences) | pca_center (1st PC around each pair's centre,
    # as repeng) | logistic (probe weight); all but mean_diff are scaled to the mean difference's norm
    method: Any = "mean_diff"  # one method, or a list: a grid axis from one pass over the pairs (rows carry `method`)
    logistic_c: float = 1.0  # inverse L2 strength of the logistic probe (scikit-learn's C)
    chat_template: bool = False  # wrap examples in the chat template before reading activations
    normalize: bool = False  # rescale every vector to unit norm (alphas are then absolute norms)
    batch_size: int = 16  # examples per forward pass while computing
    save: bool = True  # write computed vectors into the run folder as safetensors


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32  # tokens generated per completion
    do_sample: bool = False  # false = greedy
    temperature: float = 1.0  # sampling temperature (do_sample only)
    top_p: float = 1.0  # nucleus sampling mass (do_sample only)
    seed: int = 0  # base seed; each cell's sampling seed derives from it
    batch_size: int = 0  # rows per generate call; 0 = sized from the memory budget
    max_batch_size: int = 256  # cap for the automatic batch size
    chat_template: str = "auto"  # auto = use the tokenizer's template when it has one; on; off
    system_prompt: str | None = None  # system message for the chat template


@dataclass
class PromptsConfig:
    dataset: str = "prompts_default"  # shipped dataset name or a JSONL path with id/prompt
    limit: int | None = None  # use only the first N prompts


@dataclass
class JudgeConfig:
    model_path: str = MISSING  # chat model that scores completions
    rubric: str = (  # prompt; {prompt} and {completion} are filled in
        "Rate how positive the sentiment of this reply is, from 1 (very negative) to 9 (very "
        "positive). Reply with one digit.\nQuestion: {prompt}\nReply: {completion}\nRating:"
    )
    dtype: str = "auto"  # dtype of the judge model (auto: bf16 on GPU, fp32 on CPU)


@dataclass
class EvalConfig:
    metrics: list[str] = field(  # metrics computed per row while the model is loaded
        default_factory=lambda: ["word_rate", "distinct", "perplexity", "behavior_prob", "next_token_kl"]
    )
    word_lists: str = "sentiment_words"  # JSON {"positive": [...], "negative": [...]}
    behavior_dataset: Any = "sentiment_continuations"  # two-choice items for behavior_prob; or one per concept
    behavior_format: str = "continuation"  # continuation | ab
    behavior_limit: int | None = None  # score only the first N items per cell
    behavior_length_normalize: bool = False  # compare mean (not total) log-prob per answer token
    # more behaviour item sets scored at every setting, each as its file holds it (continuation or A/B): the item
    # table and steerability per set, side by side (does the vector generalise beyond its own distribution?)
    behavior_sets: list[str] = field(default_factory=list)
    regex: dict[str, str] = field(default_factory=dict)  # name -> pattern; column regex_<name> counts
    judge: JudgeConfig | None = None  # optional LLM judge (off when null)


@dataclass
class ReportConfig:
    enabled: bool = True  # write tables and plots at the end of a run
    objective: str = "behavior_prob"  # metric to maximise when naming the best cell
    concept_metric: str = "word_rate_positive"  # concept metric for the summary
    fluency_metric: str = "perplexity"  # metric that must stay within `max_fluency_increase`
    max_fluency_increase: float = 1.0  # allowed relative rise of the fluency metric over alpha 0
    csv: bool = False  # also write the merged table as CSV
    compare_runs: list[str] = field(default_factory=list)  # more run folders in the same report (models side by side)


@dataclass
class Config:
    model: ModelConfig = MISSING
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    vectors: VectorsConfig = field(default_factory=VectorsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    experiment: Any = None  # experiment presets write into the groups above (`# @package _global_`)
    task: str = "run"  # run | plan | status | vectors | merge | report
    run_dir: str | None = None  # exact results folder; null = <results_root>/<run_name>-<identity hash>
    run_name: str | None = None  # readable part of the default folder name; null = <model>-<concept>
    results_root: str = "results"  # parent of run folders (relative to the project root)
    shard_index: int | None = None  # this job's shard (0-based) when shard_count is a number
    shard_count: Any = None  # null = no sharding; N = N shards; auto = the Slurm array (sbatch --array)
    data_parallel: bool = False  # under torchrun: one replica per process, rank 0 writes
    progress: bool = True  # progress in tokens: a bar on a terminal, a log line every progress_every_s otherwise
    progress_every_s: float = 30.0  # seconds between progress lines when stderr is not a terminal (Slurm logs)


TASKS = ("run", "plan", "status", "vectors", "merge", "report")
CHAT_TEMPLATES = ("auto", "on", "off")  # generation.chat_template, and the API's chat_template


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can name it as `base_config` in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    # conf/config.yaml: jobs of a -m sweep launched at once: one for local subprocesses (each job
    # uses every core), all for Slurm (one array)
    OmegaConf.register_new_resolver(
        "steersweep_jobs_at_once", lambda target: 1 if str(target).endswith("LocalLauncher") else None, replace=True
    )
    # conf/vectors/sentiment.yaml: vectors.concept named after vectors.dataset, one name per dataset
    OmegaConf.register_new_resolver(
        "steersweep_concept",
        lambda ds: [concept_of(d) for d in ds] if isinstance(ds, (ListConfig, list)) else concept_of(ds),
        replace=True,
    )


# Words that name a file's role, not its concept: the CAA repository keeps each behaviour's files in a
# folder named after it (refusal/generate_dataset.json, refusal/test_dataset_ab.json)
ROLE_SUFFIXES = ("_pairs", "_dataset", "_ab", "_open_ended")
ROLE_NAMES = {"", "generate", "test", "train", "dataset", "data", "pairs"}


def concept_of(source: str) -> str:
    """The concept a pairs dataset is about, from its name (`vectors.concept`'s default, so the run
    folder, vector ids and rows name what was steered): `sentiment_pairs` -> sentiment,
    `.../refusal/generate_dataset.json` -> refusal (a role-only file name gives its folder's name),
    `my/formal.jsonl` -> formal. Characters a folder name should not hold become `_`."""
    p = Path(str(source))
    name = p.stem
    while any(name.endswith(s) for s in ROLE_SUFFIXES):
        name = name.removesuffix(next(s for s in ROLE_SUFFIXES if name.endswith(s)))
    if name in ROLE_NAMES:
        name = p.parent.name or p.stem
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name).lstrip(".+-") or "concept"
