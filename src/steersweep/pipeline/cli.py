"""Checks the command line before Hydra runs it: one `error:` line and exit 2 instead of a traceback.

A single run is composed once (a typo or a wrong type is one line). A `-m` sweep is expanded with
Hydra's own sweeper rules and every job is composed and validated here, before anything is
submitted: without this a bad value in one job ends, minutes later, as a submitit traceback. Two
jobs of one sweep aimed at one folder with different configs are refused too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path

MULTIRUN_FLAGS = ("-m", "--multirun")
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")  # a user's own config folder, searched before the package's


def _list_hint(cause: Exception) -> str | None:
    """`steering.layers=12.5` or `=[12.5]`: say what to write (`steering.layers=[12]`), not the keys."""
    import typing

    from omegaconf.errors import ValidationError

    key, value, owner = str(getattr(cause, "full_key", "")), getattr(cause, "value", None), cause.object_type
    if not isinstance(cause, ValidationError) or isinstance(value, (list, dict)) or value is None:
        return None
    if is_dataclass(owner) and "is not a ListConfig" in str(cause):  # a scalar where a list goes
        elem = typing.get_args(typing.get_type_hints(owner).get(cause.key))
    elif owner is list and key.endswith("]"):  # one element of the wrong type
        elem = typing.get_args(cause.ref_type)
        key = key[: key.rindex("[")]
    else:
        return None
    if elem == (int,) and isinstance(value, float) and value.is_integer() is False:
        return f"{key} takes whole numbers, not {value!r}: write {key}=[{int(value)}]"
    if elem in ((int,), (float,)) and isinstance(value, (int, float)):
        return f"{key} takes a list: write {key}=[{value!r}]"
    kind = {(int,): "whole numbers", (float,): "numbers"}.get(elem, "a list")
    return f"{key} takes {kind}, not {value!r}: write e.g. {key}=[{'12' if elem == (int,) else '0,2'}]"


def _comma_list_hint(cause: Exception, overrides: list[str]) -> str | None:
    """`-m steering.alphas=0,abc`: a sweep of scalars over a list key makes a job per value, each
    refused; say so once, naming the values that are not numbers, instead of refusing job 0's `0`."""
    import typing

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.errors import ValidationError

    owner = getattr(cause, "object_type", None)
    if not isinstance(cause, ValidationError) or not is_dataclass(owner) or "is not a ListConfig" not in str(cause):
        return None
    key = str(cause.full_key)
    swept = [o for o in OverridesParser.create().parse_overrides(overrides=overrides) if o.is_sweep_override()]
    given = next((o for o in swept if o.get_key_element().lstrip("+~") == key), None)
    values = list(given.sweep_string_iterator()) if given is not None else []
    if not values or any(v.lstrip().startswith("[") for v in values):  # a sweep of lists is what it takes
        return None
    elem = typing.get_args(typing.get_type_hints(owner).get(cause.key))
    number = {(int,): (int, "whole number", "whole numbers"), (float,): (float, "number", "numbers")}.get(elem)
    bad = []
    if number is not None:
        for v in values:
            try:
                number[0](v)
            except ValueError:
                bad.append(v)
    said = ""
    if bad:
        said = f"{', '.join(map(repr, bad))} {'is not a' if len(bad) == 1 else 'are not'} "
        said += f"{number[1] if len(bad) == 1 else number[2]}, and "
    shown = values if not bad and len(values) > 1 else ["0", "2"] if number else ["a", "b"]
    eg = "e.g. " if shown is not values else ""
    return (
        f"-m {given.input_line}: {said}a comma list after -m makes one job per value while {key} takes a list: "
        f"write {eg}{key}=[{','.join(shown)}] (one job, every value) or "
        f"'{key}={','.join(f'[{v}]' for v in shown)}' (a job per value)"
    )


def _other_group(cause: Exception, overrides: list[str], conf_dir: Path | None) -> str | None:
    """`model.offload_state_dict=true`: the key is another group's; name it, and what is said of the
    value there (`memory.offload_state_dict=true is refused: ...`), rather than only this group's keys."""
    import typing

    from steersweep.core.config import Config

    key, full = getattr(cause, "key", None), str(getattr(cause, "full_key", ""))
    groups = {g: t for g, t in typing.get_type_hints(Config).items() if is_dataclass(t)}
    places = [f"{g}.{key}" for g, t in groups.items() if key in {f.name for f in fields(t)}]
    places += [key] if key in {f.name for f in fields(Config)} - set(groups) else []  # run_dir, task...
    if len(places) != 1 or places[0] == full:
        return None
    moved = places[0]
    kind = f"a {moved.split('.')[0]} key" if "." in moved else "a top-level key"
    given = next((o for o in overrides if "=" in o and o.split("=", 1)[0].lstrip("+~") == full), None)
    if given is None:
        return f"it is {kind}: write {moved}=<value>"
    fixed = f"{moved}={given.split('=', 1)[1]}"
    if conf_dir is not None:  # what the right place says of this value
        from hydra import compose, initialize_config_dir

        from steersweep.core.errors import ConfigError
        from steersweep.pipeline.validate import validate_static

        try:
            with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
                cfg = compose(config_name="config", overrides=[fixed if o is given else o for o in overrides])
            validate_static(cfg)
        except ConfigError as refusal:
            if str(refusal).startswith(f"{moved}="):
                return f"it is {kind}, and {refusal}"
        except Exception:  # another override's own error: reported once this one is fixed
            pass
    return f"it is {kind}: write {fixed}"


def compose_error(e: Exception, overrides: Sequence[str] = (), conf_dir: Path | None = None) -> str:
    """One line for a failed composition; `overrides` and `conf_dir` let a misplaced key be found."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    msg = lines[0] if lines else type(e).__name__
    if e.__cause__ is not None:
        hint = _list_hint(e.__cause__)
        if hint is not None:
            return f"{msg.removeprefix('Error merging override ')}: {hint}"
        why = str(e.__cause__).strip().splitlines()[0]
        if msg.startswith("Error merging override "):  # a wrong value: `key=value: why`
            return f"{msg.removeprefix('Error merging override ')}: {why}"
        msg += " " + why
        typ = getattr(e.__cause__, "object_type", None)
        if is_dataclass(typ) and "not in" in str(e.__cause__):  # a misspelt key, not a wrong value
            elsewhere = _other_group(e.__cause__, list(overrides), conf_dir)
            if elsewhere is not None:
                return f"{msg}: {elsewhere}"
            msg += f"; valid keys: {', '.join(f.name for f in fields(typ))}"
    elif any(x.startswith("Available options") for x in lines):  # a group option that does not exist
        i = next(i for i, x in enumerate(lines) if x.startswith("Available options"))
        opts = [x for x in lines[i + 1 :] if "=" not in x and not x.startswith("Config search path")]
        msg += "; available: " + ", ".join(opts)
    return msg


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a `-m` sweep, as Hydra's basic sweeper will make them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _check_job(cfg) -> tuple[str | None, str | None]:
    """Everything about one job that needs no weights; returns (its folder, identity hash)."""
    from omegaconf.errors import InterpolationResolutionError

    from steersweep.pipeline.validate import validate_offline, validate_static
    from steersweep.runs.identity import check_identity, folder_for, identity, identity_hash
    from steersweep.runs.planfile import read_plan_doc

    if cfg.task not in ("run", "vectors"):
        validate_static(cfg)
        return None, None
    validate_offline(cfg, multirun=True)
    ident = identity(cfg)
    h = identity_hash(ident)
    try:
        folder = folder_for(cfg, h)
    except (InterpolationResolutionError, ValueError):  # run_dir=...${hydra:job.num}: a folder per job anyway
        return None, h
    doc = read_plan_doc(folder) if folder.is_dir() else None
    if doc is not None:
        check_identity(doc, ident, h, folder)
    return str(folder), h


def _split_config_dir(argv: list[str]) -> tuple[list[str], Path | None]:
    """argv without `--config-dir DIR` (`-cd DIR`, `--config-dir=DIR`), and DIR."""
    rest, found = [], None
    args = iter(argv)
    for a in args:
        if a in CONFIG_DIR_FLAGS:
            found = next(args, None)
        elif a.startswith("--config-dir="):
            found = a.split("=", 1)[1]
        else:
            rest.append(a)
    return rest, Path(found).expanduser().absolute() if found else None


def precheck(argv: list[str], conf_dir: Path) -> None:
    """Exit 2 with one `error:` line if the command line cannot run; return otherwise.

    With `--config-dir DIR` the configs are composed as Hydra will: DIR searched after `conf_dir`
    (Hydra puts the command line's folder just after the primary one).
    """
    argv, user_dir = _split_config_dir(argv)
    if user_dir is not None and not user_dir.is_dir():
        _die(f"--config-dir {user_dir} is not a folder: give the folder that holds your experiment/, model/... files")
    searched = [f"hydra.searchpath=['file://{_quoted(user_dir)}']"] if user_dir is not None else []
    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    flags = [a for a in argv if a.startswith("-") and a not in MULTIRUN_FLAGS]
    if flags:  # --cfg, --help, --info...: Hydra's own handling
        return
    overrides = [a for a in argv if not a.startswith("-")]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from steersweep.core.errors import USER_ERRORS

    try:
        jobs = _sweep_jobs(overrides) if multirun else [overrides]
    except (HydraException, OmegaConfBaseException) as e:
        _die(compose_error(e))
    seen: dict[str, tuple[int, str]] = {}
    for n, job in enumerate(jobs):
        where = f"job {n} ({' '.join(job)}): " if multirun and len(jobs) > 1 else ""
        own = [a for a in job if not a.lstrip("+~").startswith("hydra")]  # launcher keys: Hydra's
        try:
            with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
                cfg = compose(config_name="config", overrides=[*own, *searched])
        except (HydraException, OmegaConfBaseException) as e:
            if multirun and e.__cause__ is not None:
                hint = _comma_list_hint(e.__cause__, overrides)
                if hint is not None:
                    _die(hint)  # the sweep's, not one job's
            _die(where + compose_error(e, own, conf_dir))
        if not multirun:
            return  # a single run validates itself before loading, with its own messages
        try:
            folder, h = _check_job(cfg)
        except USER_ERRORS as e:
            _die(where + str(e))
        if folder is None:
            continue
        if folder in seen and seen[folder][1] != h:
            _die(
                f"jobs {seen[folder][0]} and {n} of this sweep would write different configs into one folder "
                f"{folder}: drop run_dir (each config gets a folder of its own) or put ${{hydra:job.num}} in it"
            )
        seen.setdefault(folder, (n, h))


def _quoted(path: Path) -> str:
    """A path inside a single-quoted Hydra override value."""
    return str(path).replace("\\", "\\\\").replace("'", "\\'")


def _die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
