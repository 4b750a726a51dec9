"""Study files: YAML loading, --set overrides, validation, grid expansion.

A study is one YAML file:

    name: linear_regression
    family: {name: linear, d: [10, 32], T: 100, sigma2: 1.0, trials: 2000}
    strategies: [replace, accumulate]
    generations: 10
    seeds: [0]
    out: results/linear_regression      # optional
    resources: {cpus_per_trial: 1}      # optional

Any family parameter given as a list is a grid axis. Every problem is reported before
anything runs, as one line naming the file and the field, and nothing is written.
This module must stay light: no torch, no ray.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import SpecError
from engine import strategies as strategy_registry
from engine.families import FAMILIES, ParamError, get_family

TOP_LEVEL_KEYS = ("name", "description", "family", "strategies", "generations", "seeds",
                  "out", "resources", "sample_last", "tracking")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")




@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None  # default: what the cluster's CPUs/GPUs hold
    max_failures: int = 2  # restarts of a chain whose driver died; it resumes from disk
    address: str | None = None  # Ray address; None starts a local Ray of its own
    # Memory a chain's driver process needs, e.g. "4GiB" (default: the family's
    # estimate): Ray places a chain only where that much is free.
    memory_per_trial: str | int | None = None

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory_per_trial is None else parse_bytes(self.memory_per_trial)


@dataclass(frozen=True)
class Tracking:
    """Where the study's runs are tracked (engine/tracking.py); nothing by default."""

    mlflow: str | None = None  # an MLflow tracking URI: file:///abs/mlruns, http://host:5000, databricks
    wandb: str | None = None  # a Weights & Biases project (WANDB_MODE=offline honoured)


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: str | int) -> int:
    """4GiB, 512MiB, 2.5GB or a number of bytes -> bytes. ValueError if not one of those."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected an amount of memory such as 4GiB, 512MiB or a number of "
                         f"bytes, got {short(value)}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class Trial:
    """One cell of the grid: one chain of generations."""

    study: str
    trial_id: str
    family: str
    strategy: str
    seed: int
    params: dict[str, Any]  # concrete family parameters (no lists)
    axes: dict[str, Any]  # this trial's value on each grid axis
    generations: int = 1  # how long this chain runs
    sample_last: bool = False  # whether the last generation samples a corpus too
    workflow: dict[str, Any] | None = None  # the study's own strategy's definition (None: built in)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Trial":
        # trial.json carries more than the Trial (how its seeds were derived)
        names = {f.name for f in dataclasses.fields(Trial)}
        return Trial(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Study:
    name: str
    family: str
    family_params: dict[str, Any]  # an axis's value is the list of its values
    strategies: tuple[str, ...]
    generations: dict[str, int]  # per strategy
    seeds: tuple[int, ...]
    out: str
    resources: Resources
    description: str = ""
    source: str = "<study>"
    document: dict[str, Any] = field(default_factory=dict, compare=False)  # resolved YAML
    axis_keys: tuple[str, ...] | None = None  # None: every list-valued parameter
    # The last generation's corpus trains nothing in this study; it is sampled only when
    # asked (its diversity metrics, or a study to be extended later).
    sample_last: bool = False
    tracking: Tracking = field(default_factory=Tracking)
    # The study's own strategies (engine/strategies.workflow): name -> definition.
    workflows: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def axes(self) -> dict[str, list[Any]]:
        if self.axis_keys is not None:
            return {k: self.family_params[k] for k in self.axis_keys}
        return {k: v for k, v in self.family_params.items() if isinstance(v, list)}

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of axis values, in file order."""
        axes = self.axes
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]

    def trials(self) -> list[Trial]:
        out = []
        for strategy in self.strategies:
            for point in self.grid_points():
                for seed in self.seeds:
                    params = {**self.family_params, **point}
                    out.append(Trial(
                        study=self.name,
                        trial_id=trial_id(strategy, point, seed),
                        family=self.family,
                        strategy=strategy,
                        seed=seed,
                        params=params,
                        axes=point,
                        generations=self.generations[strategy],
                        sample_last=self.sample_last,
                        workflow=self.workflows.get(strategy),
                    ))
        return out


def trial_id(strategy: str, axes: dict[str, Any], seed: int) -> str:
    # Built from values, not grid position, so adding an axis value later never renames
    # (and so never orphans) the chains already on disk.
    parts = [strategy] + [f"{k}={axis_label(v)}" for k, v in axes.items()] + [f"seed={seed}"]
    return "__".join(parts)


def axis_label(value: Any) -> Any:
    """An axis value as chain ids and the results table write it: a list as Python
    prints it (`['ungrammatical']`, as chains on disk are named); a mapping as key:value
    pairs joined by commas (`name:truncated_ce,threshold:0.9`), no braces, quotes or
    spaces, since it names directories; None as `None` (a NaN cell would drop out of
    every pivot, and the trial id writes it so); anything else as it is."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        return ",".join(f"{k}:{axis_label(v)}" for k, v in value.items())
    return str(value) if isinstance(value, list) else value


# ---------------------------------------------------------------- loading and overrides

def parse_override(text: str) -> tuple[str, Any]:
    """`family.d=7` -> ("family.d", 7). Values are YAML: `[replace,accumulate]` is a list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError(f"--set {text}: expected KEY=VALUE with a dotted KEY, "
                        "e.g. --set family.d=7")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise SpecError(f"--set {text}: value is not valid YAML ({e.__class__.__name__})") from None
    return key, value


def apply_override(document: dict[str, Any], key: str, value: Any) -> None:
    node = document
    path = key.split(".")
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise SpecError(f"--set {key}: {where} is not a mapping, so it has no field "
                            f"{path[i + 1]!r}")
        node = child
    node[path[-1]] = value


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps
    the last: `generations: 3` ... `generations: 2` would run 2 without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice, at lines {seen[key]} and {line}: "
                                "keep one", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep)


def short(value: Any, limit: int = 200) -> str:
    """repr(value), cut to `limit` characters: a message never quotes a whole document
    (six nested YAML aliases make a 459-byte file a value of millions of items)."""
    import reprlib

    r = reprlib.Repr()  # (keyword arguments only from Python 3.12)
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 8, 8, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_study(path: str | Path, overrides: typing.Sequence[str] = ()) -> Study:
    """Read, override and validate a study file. Raises SpecError with one line."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{source}: no such study file")
    try:
        document = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError as e:
        raise SpecError(f"{source}: not UTF-8 text (byte {e.start}: {e.reason}); save the "
                        "study file as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{source}: not valid YAML{where}: "
                        f"{getattr(e, 'problem', None) or e}") from None
    if not isinstance(document, dict):
        raise SpecError(f"{source}: a study file must be a YAML mapping with keys "
                        f"{', '.join(TOP_LEVEL_KEYS)}")
    overridden = set()
    for text in overrides:
        key, value = parse_override(text)
        apply_override(document, key, value)
        overridden.add(key)
    return validate(document, source, overridden, p.parent)


# ---------------------------------------------------------------------- validation

# Far beyond any study (the field's run up to tens), and what keeps a plan or a typo
# (`generations: 1000000000`) from running for days before anything is said.
MAX_GENERATIONS = 10_000


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null", dict: "a mapping"}.get(annotation, str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is type(None):
        return value is None
    return isinstance(value, annotation)


class _Checker:
    def __init__(self, source: str, overridden: set[str], base: Path | None = None):
        self.source = source
        self.overridden = overridden
        self.base = base  # the study file's directory

    def fail(self, field_name: str, message: str) -> typing.NoReturn:
        origin = " (from --set)" if any(
            field_name == k or field_name.startswith(k + ".") or field_name.startswith(k + "[")
            for k in self.overridden) else ""
        raise SpecError(f"{self.source}: {field_name}{origin}: {message}")

    def typed(self, field_name: str, value: Any, annotation: Any) -> Any:
        if not _matches(value, annotation):
            self.fail(field_name, f"expected {_describe(annotation)}, got {short(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(field_name, f"must be a finite number, got {value}")
        # YAML reads `1` as an int; a float parameter keeps its type so trial ids and
        # tables do not depend on how the user happened to write the number.
        admitted = typing.get_args(annotation) or (annotation,)
        if _matches(value, int) and float in admitted and int not in admitted:
            return float(value)
        return value


def validate(document: dict[str, Any], source: str = "<study>",
             overridden: set[str] | None = None, base: Path | None = None) -> Study:
    """A validated Study; `base`, the study file's directory, anchors its relative paths."""
    check = _Checker(source, overridden or set(), base)
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            check.fail(str(key), f"unknown key (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    for key in ("name", "family", "strategies", "generations", "seeds"):
        if key not in document:
            check.fail(key, "missing (required keys: name, family, strategies, "
                            "generations, seeds)")

    name = document["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        check.fail("name", f"expected a name of letters, digits, '_', '-' or '.', got {short(name)}")
    description = document.get("description") or ""
    if not isinstance(description, str):
        check.fail("description", f"expected a string, got {short(description)}")

    family_name, family_params, axis_keys = _validate_family(check, document["family"])
    strategies, workflows = _validate_strategies(check, document["strategies"])

    generations = _validate_generations(check, document["generations"], strategies)

    seeds = document["seeds"]
    if not isinstance(seeds, list) or not seeds:
        check.fail("seeds", f"expected a non-empty list of integers, e.g. [0, 1], got {short(seeds)}")
    for i, s in enumerate(seeds):
        if not _matches(s, int) or s < 0:
            check.fail(f"seeds[{i}]", f"expected an integer >= 0, got {short(s)}")
    if len(set(seeds)) != len(seeds):
        check.fail("seeds", f"repeated seed in {short(seeds)}")

    out = document.get("out")
    if out is None:
        out = f"results/{name}"
    if not isinstance(out, str) or not out.strip():
        check.fail("out", f"expected a directory path, got {short(out)}")
    out = _run_out(check, out)

    resources = _validate_resources(check, document.get("resources") or {})
    tracking = _validate_tracking(check, document.get("tracking") or {})
    sample_last = document.get("sample_last", False)
    if not isinstance(sample_last, bool):
        check.fail("sample_last", f"expected true or false, got {short(sample_last)}")

    study = Study(
        name=name, family=family_name, family_params=family_params,
        strategies=tuple(strategies), generations=generations, seeds=tuple(seeds), out=out,
        resources=resources, description=description, source=source, document=document,
        sample_last=sample_last, tracking=tracking, workflows=workflows,
        axis_keys=axis_keys,
    )
    _validate_grid(check, study)
    return study


def _validate_family(check: _Checker, family: Any) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    if not isinstance(family, dict) or "name" not in family:
        check.fail("family", "expected a mapping with a `name` and that family's parameters, "
                             f"e.g. {{name: linear, d: 10}} (families: {', '.join(FAMILIES)})")
    name = family["name"]
    if name not in FAMILIES:
        check.fail("family.name", f"unknown family {short(name)} (known: {', '.join(FAMILIES)})")
    fam = get_family(name)
    hints = typing.get_type_hints(fam.Config)
    fields = {f.name: f for f in dataclasses.fields(fam.Config)}
    params: dict[str, Any] = {}
    axis_keys: list[str] = []
    for key, value in family.items():
        if key == "name":
            continue
        if key not in fields:
            check.fail(f"family.{key}", f"unknown parameter of family {short(name)} "
                                        f"(allowed: {', '.join(fields)})")
        # A list is a grid axis, except for a parameter that is itself a list (such
        # as an image family's conv `widths`): there a list of lists is the axis (null
        # among them, where the parameter may be null: its default).
        list_valued = list in (typing.get_args(hints[key]) or (hints[key],))
        of_lists = isinstance(value, list) and any(isinstance(v, list) for v in value) and all(
            isinstance(v, list) or (v is None and type(None) in typing.get_args(hints[key]))
            for v in value)
        if isinstance(value, list) and (not list_valued or of_lists):
            if not value:
                check.fail(f"family.{key}", "an empty list gives an empty grid; give a value "
                                            "or a non-empty list")
            values = [check.typed(f"family.{key}[{i}]", v, hints[key]) for i, v in enumerate(value)]
            if len(set(map(repr, values))) != len(values):
                check.fail(f"family.{key}", f"repeated value in {short(value)}")
            params[key] = values
            axis_keys.append(key)
        else:
            params[key] = check.typed(f"family.{key}", value, hints[key])
    for key, f in fields.items():
        if key not in params:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                check.fail(f"family.{key}", f"missing (family {short(name)} requires it)")
            params[key] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    # Paths written in the study file are relative to the file; a --set value is typed in
    # a shell, so it stays relative to where collapse runs.
    if check.base is not None:
        for key in fam.path_fields:
            if key in family and f"family.{key}" not in check.overridden:
                value = params[key]
                resolve = (lambda v: fam.resolve_path(v, check.base)
                           if isinstance(v, str) else v)
                params[key] = [resolve(v) for v in value] if isinstance(value, list) \
                    else resolve(value)
    return name, params, tuple(axis_keys)


def _run_out(check: _Checker, out: str) -> str:
    """`out` is where the run lives: a directory (local, or a shared filesystem mounted on
    every node: NFS, EFS, Filestore) or an object-store URI every node reaches (s3://,
    gs://), see engine/files/uris.py. file:// URIs are paths; other schemes are refused before
    anything runs."""
    from engine.files import OBJECT_STORES, split_uri

    scheme, rest = split_uri(out)
    if not scheme:
        return rest
    if scheme in OBJECT_STORES:
        if not rest.strip("/"):
            check.fail("out", f"{out}: no bucket; give one, e.g. {scheme}://my-bucket/runs/x")
        return out
    check.fail("out", f"{out}: unsupported scheme {scheme}:// (supported: a path, file://, "
                      "s3://, gs://); use an object-store bucket or a shared filesystem "
                      f"mounted on every node, e.g. /mnt/shared/{Path(rest).name}")


def _validate_strategies(check: _Checker, strategies: Any) -> tuple[list[str], dict[str, dict]]:
    """Names of built-in strategies, or mappings that define the study's own
    (engine/strategies.workflow): the names, and name -> definition for the latter."""
    if isinstance(strategies, str):
        strategies = [strategies]
    if not isinstance(strategies, list) or not strategies:
        check.fail("strategies", "expected a non-empty list, e.g. [replace, accumulate] "
                                 f"(known: {', '.join(strategy_registry.STRATEGIES)})")
    names, workflows = [], {}
    for i, s in enumerate(strategies):
        if isinstance(s, dict):
            name = s.get("name")
            if not isinstance(name, str) or not NAME_PATTERN.match(name):
                check.fail(f"strategies[{i}].name", "a workflow needs a name of letters, "
                                                    f"digits, '_', '-' or '.', got {short(name)}")
            definition = {k: v for k, v in s.items() if k != "name"}
            try:
                strategy_registry.workflow(name, definition)
            except strategy_registry.WorkflowError as e:
                check.fail(f"strategies[{i}].{e.field}", e.message)
            workflows[name] = definition
            names.append(name)
        elif s not in strategy_registry.STRATEGIES:
            check.fail(f"strategies[{i}]", f"unknown strategy {short(s)} (known: "
                                           f"{', '.join(strategy_registry.STRATEGIES)}; or a "
                                           "mapping that defines a workflow, e.g. {name: "
                                           "real_half, real: {fraction: 0.5}})")
        else:
            names.append(s)
    if len(set(names)) != len(names):
        check.fail("strategies", f"repeated strategy in {short(names)}")
    return names, workflows


def _validate_generations(check: _Checker, generations: Any, strategies: list[str]) -> dict[str, int]:
    """An integer for every strategy, or a mapping strategy -> integer (a `default` key
    covers the strategies not named), e.g. {replace: 10, default: 5}."""
    if not isinstance(generations, dict):
        generations = {"default": generations}
    for key, n in generations.items():
        where = "generations" if key == "default" and len(generations) == 1 else f"generations.{key}"
        if key != "default" and key not in strategies:
            check.fail(where, f"not one of this study's strategies ({', '.join(strategies)}) "
                              "or `default`")
        if not _matches(n, int) or n < 1:
            check.fail(where, f"expected an integer >= 1, got {short(n)}")
        if n > MAX_GENERATIONS:
            check.fail(where, f"at most {MAX_GENERATIONS:,} generations a chain, got {n:,}")
    missing = [s for s in strategies if s not in generations and "default" not in generations]
    if missing:
        check.fail("generations", f"no count for {', '.join(missing)}; add them or a `default`")
    return {s: generations.get(s, generations.get("default")) for s in strategies}


def _validate_resources(check: _Checker, resources: Any) -> Resources:
    if not isinstance(resources, dict):
        check.fail("resources", f"expected a mapping, got {short(resources)}")
    hints = typing.get_type_hints(Resources)
    values = {}
    for key, value in resources.items():
        if key not in hints:
            check.fail(f"resources.{key}", f"unknown key (allowed: {', '.join(hints)})")
        values[key] = check.typed(f"resources.{key}", value, hints[key])
    r = Resources(**values)
    if r.cpus_per_trial <= 0:
        check.fail("resources.cpus_per_trial", f"must be > 0, got {r.cpus_per_trial}")
    if r.gpus_per_trial < 0:
        check.fail("resources.gpus_per_trial", f"must be >= 0, got {r.gpus_per_trial}")
    if r.max_failures < -1:
        check.fail("resources.max_failures", f"must be >= -1, got {r.max_failures}")
    if r.max_concurrent_trials is not None and r.max_concurrent_trials < 1:
        check.fail("resources.max_concurrent_trials",
                   f"must be >= 1 or null, got {r.max_concurrent_trials}")
    if r.memory_per_trial is not None:
        try:
            if r.memory_bytes <= 0:
                raise ValueError(f"must be > 0, got {short(r.memory_per_trial)}")
        except ValueError as e:
            check.fail("resources.memory_per_trial", str(e))
    return r


def _validate_tracking(check: _Checker, tracking: Any) -> Tracking:
    from engine import tracking as trackers

    if not isinstance(tracking, dict):
        check.fail("tracking", f"expected a mapping such as {{mlflow: file:///abs/mlruns}}, "
                               f"got {short(tracking)}")
    hints = typing.get_type_hints(Tracking)
    values = {}
    for key, value in tracking.items():
        if key not in hints:
            check.fail(f"tracking.{key}", f"unknown tracker (known: {', '.join(hints)}; "
                                          "TensorBoard files are always written)")
        values[key] = check.typed(f"tracking.{key}", value, hints[key])
        if values[key] is not None:
            if not str(values[key]).strip():
                check.fail(f"tracking.{key}", "expected a non-empty value")
            module = trackers.missing_package(key)
            if module:
                check.fail(f"tracking.{key}", f"needs the {module} package, which is not "
                                              f"installed: {trackers.EXTRA}")
    return Tracking(**values)


def _validate_grid(check: _Checker, study: Study) -> None:
    fam = get_family(study.family)
    for i, s in enumerate(study.document["strategies"] if isinstance(
            study.document["strategies"], list) else []):
        if isinstance(s, dict) and "weights" in s and not fam.weighted_fit:
            # (imports every family: only on this error path)
            weighted = ", ".join(n for n in FAMILIES if get_family(n).weighted_fit)
            check.fail(f"strategies[{i}].weights", f"the {study.family} family's fit does "
                       f"not weight its rows yet (families that do: {weighted}); drop "
                       "`weights`, or study weighting on one of those")
    for point in study.grid_points():
        try:
            fam.from_params({**study.family_params, **point}).validate()
        except ParamError as e:
            where = (" at " + ", ".join(f"{k}={v}" for k, v in point.items())) if point else ""
            check.fail(f"family.{e.field}", f"{e.message}{where}")
