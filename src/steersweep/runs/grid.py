"""The grid: the cells a config asks for and the batches they are made in, fixed before any weight is
read (identity is in `identity`, the claim in `planfile`, shards in `launch`).

- **Identity**: the config keys that define what a row means (model, vectors, decoding, the grid,
  prompts, metrics), with a short hash. The hash names the default folder and is part of every
  cell id, so rows of two configs can never be mistaken for each other.
- **Cells** (prompt x concept x method x mode x layer set x alpha x sample) in one canonical order, cut into **batches** of a
  fixed size. The batch a row is made in is part of the plan, so rows are a function of
  (cell, plan), whatever order workers start, die or come back in.
- **Dealing**: batch b belongs to worker `b % n_workers` over the *full* plan; only then are
  finished batches dropped. A shard that starts late, is throttled, cancelled, requeued or run
  twice therefore finds exactly its own batches still to do, and a run with one worker takes all.
- **Claim**: the identity and the batch list are written into the folder atomically (`plan.json`)
  before the model loads; a job whose identity differs is refused at once, naming the keys.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

DEFAULT_BATCH = 64  # rows per planned batch when generation.batch_size=0


@dataclass(frozen=True)
class Cell:
    cell_id: str
    layer: int  # the first (lowest) layer of the cell's layer set
    alpha: float
    prompt_id: str
    prompt: str
    sample: int
    seed: int
    layers: tuple[int, ...] = ()  # every layer the cell steers (each with its own vector); () = (layer,)
    layer_set: str = ""  # its label: "10", "10+14" or "all"; "" = str(layer)
    concept: str = ""  # the concept of its vectors (vectors.concept)
    method: str = "mean_diff"  # extraction method of its vectors (vectors.method)
    mode: str = "add"  # injection mode (steering.mode)

    @property
    def steered_layers(self) -> tuple[int, ...]:
        return self.layers or (self.layer,)

    @property
    def label(self) -> str:
        return self.layer_set or str(self.layer)

    @property
    def decode_key(self) -> tuple:
        """Cells with one key are one decode. Alpha 0 is the unsteered model whatever the concept,
        layer set, method or mode: every alpha-0 cell of a prompt and sample shares one baseline
        decode (and one seed), so the baseline is the same row for every layer, in every dtype."""
        return ("baseline", self.prompt_id, self.sample) if self.alpha == 0 else (self.cell_id,)

    @property
    def setting(self) -> tuple[str, str, float, str, str]:
        """What a per-setting metric (behavior_prob, next_token_kl) is a function of: the cell
        minus its prompt and sample (see `RunFolder.setting_done`)."""
        return (self.concept, self.label, float(self.alpha), self.method, self.mode)


@dataclass(frozen=True)
class Batch:
    index: int
    cells: tuple[Cell, ...]

    @property
    def batch_id(self) -> str:
        return f"b{self.index:05d}"


# ---------------------------------------------------------------------------------------------
# Cells and batches


def cell_key(ident_hash: str, layer: int, alpha: float, prompt_id: str, sample: int, extra: str = "") -> str:
    return hashlib.sha1(f"{ident_hash}|{layer}|{alpha!r}|{prompt_id}|{sample}{extra}".encode()).hexdigest()[:16]


def cell_seed(base_seed: int, concept: str, layer: int | str, alpha: float, prompt_id: str, sample: int) -> int:
    """Sampling seed of a cell: its coordinates only, so a cell samples alike in any grid or folder.
    Methods and modes share seeds (paired comparisons: the same noise under another steering)."""
    h = int(hashlib.sha1(f"{concept}|{layer}|{alpha!r}|{prompt_id}|{sample}".encode()).hexdigest()[:16], 16)
    return (base_seed * 1_000_003 + h) % 2**31


def as_list(value) -> list:
    """A config value that may be one item or a list of items (steering.mode, vectors.method)."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def concepts(vec) -> list[tuple[str, str | None]]:
    """[(concept, its pairs dataset or its vector file)] from the `vectors` group: `vectors.concept`
    may be a list, taken place by place with `vectors.dataset` (source=compute) or `vectors.path`
    (source=file)."""
    names = [str(c) for c in as_list(vec.get("concept", "concept"))]
    source = vec.get("path") if vec.get("source", "compute") == "file" else vec.get("dataset")
    sources = as_list(source) if source is not None else [None]
    if len(sources) != len(names):
        raise ValueError(
            f"vectors.concept lists {len(names)} concept(s) but vectors.{'path' if vec.get('source') == 'file' else 'dataset'}"
            f" gives {len(sources)}: give one per concept, in the same order"
        )
    return [(n, None if x is None else str(x)) for n, x in zip(names, sources, strict=True)]


def set_label(item) -> str:
    """The label of one `steering.layers` item: "10", "10+14" (its layers sorted) or "all"."""
    if isinstance(item, (str, int)):
        return str(item)
    return "+".join(str(x) for x in sorted(int(x) for x in item))


def layer_sets(spec, num_layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """`steering.layers` -> [(label, layers)]: an int is one layer, a list is one cell steering every
    layer in it ("10+14"), "all" every decoder layer (needs `num_layers`, from the model's config)."""
    out = []
    for item in as_list(spec):
        if isinstance(item, str):
            if item != "all":
                raise ValueError(f"steering.layers item {item!r}: use a layer number, a list of them, or all")
            if num_layers is None:
                raise ValueError("steering.layers=all needs the model's number of layers")
            out.append(("all", tuple(range(num_layers))))
        elif isinstance(item, int):
            out.append((set_label(item), (int(item),)))
        else:
            out.append((set_label(item), tuple(sorted(int(x) for x in item))))
    return out


def grid_origin(cfg: DictConfig) -> str:
    """Where the grid's layers and alphas come from, in words: the model preset's defaults
    (`model.recommended_layers` / `recommended_alphas`, what `steering.*` interpolates unless set) or
    the command. `task=plan` and the run log print it, so a sweep never runs on a grid nobody chose."""
    said = []
    for key, preset in (("layers", "recommended_layers"), ("alphas", "recommended_alphas")):
        values = ", ".join(set_label(x) if key == "layers" else f"{float(x):g}" for x in cfg.steering[key])
        default = OmegaConf.is_interpolation(cfg.steering, key)
        why = f"model {cfg.model.name}'s {preset}; set steering.{key} to choose" if default else f"steering.{key}"
        said.append(f"{key} [{values}] ({why})")
    return "; ".join(said)


def _plain(item):
    """A `steering.layers` item as plain Python: a layer, "all", or a tuple of layers."""
    return item if isinstance(item, (str, int)) else tuple(int(x) for x in item)


@dataclass(frozen=True)
class Grid:
    """The sweep's axes, read from the composed config once (`Grid.of`): what the plan is cut from.
    The stages after the plan (vectors, generation, scoring) take these values and never re-read
    `steering.*` or `vectors.*`."""

    concepts: tuple[tuple[str, str | None], ...]  # (concept, its pairs dataset or vector file)
    methods: tuple[str, ...]
    modes: tuple[str, ...]
    layers: tuple  # `steering.layers` items as given: a layer, a tuple of layers, or "all"
    alphas: tuple[float, ...]
    samples: int
    seed: int  # generation.seed: each cell's sampling seed derives from it
    batch_size: int  # planned decodes per batch: generation.batch_size, or DEFAULT_BATCH for 0
    batch_size_asked: bool  # whether the command named a batch size (0 = the default)
    origin: str = ""  # where layers and alphas came from, in words (`grid_origin`)

    @classmethod
    def of(cls, cfg: DictConfig) -> Grid:
        """The grid a composed config asks for. Schema defaults stand in for what a partial config
        (tests, the API) leaves out, so such configs plan alike."""
        asked = int(cfg.generation.get("batch_size", 0) or 0)
        return cls(
            concepts=tuple(concepts(cfg.vectors)),
            methods=tuple(str(m) for m in as_list(cfg.vectors.get("method", "mean_diff"))),
            modes=tuple(str(m) for m in as_list(cfg.steering.get("mode", "add"))),
            layers=tuple(_plain(x) for x in as_list(cfg.steering.layers)),
            alphas=tuple(float(x) for x in cfg.steering.alphas),
            samples=int(cfg.steering.get("samples", 1)),
            seed=int(cfg.generation.get("seed", 0)),
            batch_size=asked or DEFAULT_BATCH,
            batch_size_asked=bool(asked),
            origin=grid_origin(cfg) if "model" in cfg and "name" in cfg.model else "",
        )

    @property
    def concept_names(self) -> list[str]:
        return [c for c, _ in self.concepts]

    def layer_sets(self, num_layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
        return layer_sets(list(self.layers), num_layers)

    def all_layers(self, num_layers: int | None = None) -> list[int]:
        """Every layer some cell steers: the layers vectors are needed for."""
        return sorted({layer for _, ls in self.layer_sets(num_layers) for layer in ls})

    def vector_keys(self) -> list[tuple[str, str]]:
        """(concept, method) of every vector set the sweep steers with, in grid order."""
        return [(c, m) for c in self.concept_names for m in self.methods]


def expand(grid: Grid, prompts: list[dict], ident_hash: str, num_layers: int | None = None) -> list[Cell]:
    """prompts x concepts x methods x modes x layer sets x alphas x samples, in the canonical order.

    Prompt-major: a batch then holds few distinct prompts (little padding; shared prefills are
    computed once per prompt). Each prompt starts with its baseline: the alpha-0 cells of every
    concept, method, mode and layer set, side by side (one decode, see `Cell.decode_key`, kept in one
    batch by `cut`), then its steered cells. A grid of single layers, one method and one mode keeps
    the cell ids it had before those axes existed.
    """
    sets = grid.layer_sets(num_layers)
    alphas, methods, modes, names = grid.alphas, grid.methods, grid.modes, grid.concept_names
    plain = len(methods) == 1 and len(modes) == 1 and all(len(ls) == 1 and lb != "all" for lb, ls in sets)
    many = len(names) > 1

    def cell(p: dict, concept: str, method: str, mode: str, label: str, layers: tuple, alpha: float, s: int) -> Cell:
        extra = ("" if plain else f"|{label}|{method}|{mode}") + (f"|{concept}" if many else "")
        cid = cell_key(ident_hash, layers[0], alpha, p["id"], s, extra)
        # the baseline's seed is the prompt's and sample's alone: one unsteered decode for all
        seed = cell_seed(grid.seed, *((concept, label) if alpha else ("", "baseline")), alpha, p["id"], s)
        return Cell(cid, layers[0], alpha, p["id"], p["prompt"], s, seed, layers, label, concept, method, mode)

    variants = [(c, m, mode, lb, ls) for c in names for m in methods for mode in modes for lb, ls in sets]
    cells = []
    for p in prompts:
        if 0.0 in alphas:
            cells += [cell(p, *v, 0.0, s) for s in range(grid.samples) for v in variants]
        cells += [cell(p, *v, a, s) for v in variants for a in alphas if a != 0 for s in range(grid.samples)]
    return cells


def cut(cells: list[Cell], size: int) -> list[Batch]:
    """Batches of `size` decodes each, in order: cells sharing a decode (`Cell.decode_key`: a
    prompt's baseline) count once and are never split between batches."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.decode_key, []).append(c)
    units = list(groups.values())
    return [
        Batch(i, tuple(c for u in units[s : s + size] for c in u)) for i, s in enumerate(range(0, len(units), size))
    ]


def batch_cells(doc: dict) -> list[list[str]]:
    """The cell ids of each planned batch, as a claimed plan.json fixes them."""
    order = [row[0] for row in doc["cells"]]
    bounds = [0, *itertools.accumulate(doc["batch_cells"])]
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


def deal(batches: list[Batch], worker: int, n_workers: int) -> list[Batch]:
    """The batches of one worker: a fixed function of the batch over the full plan."""
    return [b for b in batches if b.index % n_workers == worker]


def todo(batches: list[Batch], done: set[str], worker: int, n_workers: int) -> list[Batch]:
    """What a worker still has to do: its dealt batches minus those whose cells are all present.

    Dealing happens first, over the full plan; finished work is dropped only afterwards, so the
    share of a worker never depends on what other workers have finished.
    """
    return [b for b in deal(batches, worker, n_workers) if not all(c.cell_id in done for c in b.cells)]
