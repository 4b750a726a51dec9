"""What every model family is: one class, `Family`, and its config.

A family is the only place that knows what a sample is (a label vector, a point, a
story, an image). The chain calls its verbs in order and never looks inside their
values:

    real  = family.real_data(seed, chunks, cache_dir)   the study's real data, fixed by seed
    model = family.fit(real, mix, seed, context)         a fresh model fit to the mix
    family.evaluate(real, model)                         metrics on REAL held-out data
    table = family.sample(real, model, n, seed)          the next synthetic corpus
    family.save_model(model, dir) / load_model(dir)      what the chain checkpoints

Each family class carries a nested `Config` dataclass: its fields are the study file's
family parameters, each with its type, default and a comment saying what it means
(`collapse params` lists them). A family object is built once per chain from one
concrete grid point (`family_for(trial)`) and holds that config as `self.config`.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import pyarrow as pa
from engine.errors import CollapseError

if TYPE_CHECKING:
    import numpy as np
    from engine.corpus import CorpusView
    from engine.files import Location
    from engine.fit import FitContext
    from engine.plan import Cost


class ParamError(CollapseError, ValueError):
    """A family parameter is invalid. `field` is the parameter's name (e.g. "T")."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Bundle:
    """One process's Ray resources, and the family parameter behind each amount (for
    the error that names the field when no node can hold it)."""

    what: str  # e.g. "trainer worker"
    resources: dict[str, float]  # Ray resource name -> amount
    fields: dict[str, str]  # Ray resource name -> family parameter


@dataclass(frozen=True)
class Processes:
    """Processes of one kind a chain starts besides its driver: `most` of them, each
    holding `bundle`; `fewest`, what an elastic fit goes on with (default: most).
    Processes of different `phase`s ("fit", "sample") never run at the same time."""

    bundle: Bundle
    most: int
    phase: str
    fewest: int | None = None


def held(placement: list[Processes], resource: str) -> float:
    """The most of a Ray resource a chain's processes hold at once: the phase that
    holds the most (its processes all at their most)."""
    by_phase: dict[str, float] = {}
    for p in placement:
        by_phase[p.phase] = by_phase.get(p.phase, 0.0) + p.most * p.bundle.resources.get(
            resource, 0.0)
    return max(by_phase.values(), default=0.0)


@dataclass(frozen=True)
class Param:
    """One family parameter as `collapse params` lists it."""

    name: str
    type: str
    default: Any
    meaning: str  # the comment beside the field in the family's Config


def _field_comments(config: type) -> dict[str, str]:
    """The comment written beside each field of a Config dataclass (and of the
    dataclasses it extends): the one place a parameter's meaning is written."""
    import inspect
    import re

    comments: dict[str, str] = {}
    for klass in reversed(config.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        last = None  # a comment-only line right after a field goes on with its comment
        for line in inspect.getsource(klass).splitlines():
            field = re.match(r"\s+(\w+)\s*:[^#]*#\s?(.*)$", line)
            more = re.match(r"\s+#\s?(.*)$", line)
            if field:
                last = field.group(1)
                comments[last] = field.group(2).strip()
            elif more and last:
                comments[last] += " " + more.group(1).strip()
            else:
                last = None
    return comments


def summary(family: "type[Family]") -> str:
    """A family in one line: its class's docstring, else its module's, first paragraph."""
    import sys

    doc = family.__dict__.get("__doc__") or sys.modules[family.__module__].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def describe_params(family: "type[Family]") -> list[Param]:
    """Every parameter of a family: name, type, default and meaning."""
    comments = _field_comments(family.Config)
    out = []
    for f in dataclasses.fields(family.Config):
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(Param(f.name, kind, default, comments.get(f.name, "")))
    return out


# What reads a parameter, declared where the parameter is (`field(metadata=...)`):
#   fit         the model a generation trains (generation 1 included)
#   sampling    only sampling or scoring a corpus
#   placement   where and with what work runs, not what it computes
#   later_fits  fits after generation 1 only (how they start)
# Chains whose grid points agree on the `fit` parameters (and the data) share one
# generation-1 model (Family.fit_params). A family's Config declares every field's role.
ROLES = ("fit", "sampling", "placement", "later_fits")


def fit(default: Any):
    """A Config field the fit reads."""
    return dataclasses.field(default=default, metadata={"role": "fit"})


def sampling(default: Any):
    """A Config field only sampling or scoring reads."""
    return dataclasses.field(default=default, metadata={"role": "sampling"})


def resources(default: Any):
    """A Config field that says where and with what work runs (role `placement`)."""
    return dataclasses.field(default=default, metadata={"role": "placement"})


def later_fits(default: Any):
    """A Config field read by the fits after generation 1 only."""
    return dataclasses.field(default=default, metadata={"role": "later_fits"})


def role(f: "dataclasses.Field") -> str:
    """A Config field's role; a field declared without one counts as read by the fit
    (the safe side: chains that differ in it never share a model)."""
    return f.metadata.get("role", "fit")


@dataclass(frozen=True)
class Presentation:
    """How `collapse table`, `plot` and `report` show a family, apart from its verbs and
    its placement: every part optional, the defaults a plain pivot and plain plots."""

    paper_table: bool = False  # `collapse table` prints the seed paper's Table 2 layout
    # metric -> a metric no generation changes, drawn as a reference line under it
    reference_lines: dict[str, str] = dataclasses.field(default_factory=dict)
    # (family, a few corpus rows) -> those samples as images, (k, H, W) or (k, H, W, 3) in
    # [0, 1], or None: kept per corpus for the sample grids of `collapse plot`
    previews: Callable[["Family", pa.Table], Any] | None = None
    # (a few corpus rows, the model that sampled them) -> the samples as text, for
    # `collapse report` (the model's directory holds its tokenizer)
    sample_text: Callable[[pa.Table, "Location"], list[str]] | None = None


class Family(ABC):
    name: ClassVar[str]
    Config: ClassVar[type]  # a frozen dataclass: the study file's family parameters
    metrics: ClassVar[tuple[str, ...]]  # what evaluate() returns; the first is the headline
    theory_for: ClassVar[str | None] = None  # the metric `theory` gives the closed form of
    # How results/ shows the family (optional parts; see Presentation)
    presentation: ClassVar[Presentation] = Presentation()
    # fit() honours a weighted mix: the table's corpus.WEIGHT column, each row's loss
    # weight (a workflow's `weights`); a study giving weights to another family is refused
    weighted_fit: ClassVar[bool] = False
    # The count column a row's loss is a mean over, for a weighted mix's per-row weights
    # (CorpusStore._kind_weights): None, rows (each example one loss term)
    weight_unit: ClassVar[str | None] = None
    # Parameters that name files, resolved against the study file's directory, and the
    # values of those parameters that are names, not paths (e.g. "digits").
    path_fields: ClassVar[tuple[str, ...]] = ()
    path_keywords: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "Family":
        return cls(cls.Config(**params))

    @classmethod
    def resolve_path(cls, value: str, base: Path) -> str:
        """A path parameter's value as written in a study file in directory `base`:
        relative paths are relative to the study file, not to where `collapse` runs."""
        import os

        from engine.files import is_remote

        if value in cls.path_keywords or is_remote(value) or os.path.isabs(value):
            return value
        return os.path.normpath(os.path.join(base, value))

    # ------------------------------------------------------------- must give
    @abstractmethod
    def real_data(self, seed: int, chunks: int, cache_dir: "Location") -> Any:
        """The chain's real data, fixed by the study seed. Must expose `train_chunks`,
        `chunks` items of T rows each — T, the rows of one generation, is the unit every
        strategy counts in: pyarrow Tables, or engine.corpus.StoredRows (rows a corpus on
        storage holds, which the chain links instead of copying). The rest (held-out
        test data, fixed features, the true model) is the family's own business.
        `cache_dir`, in the run's storage, is shared by every chain of the study."""

    @abstractmethod
    def fit(self, real: Any, mix: Any, seed: int, context: "FitContext") -> Any:
        """A fresh model fit to the mix (a pyarrow Table, or a Ray Dataset if
        data_view() says so). `context.workdir` is scratch space of this chain and
        generation in the run's storage, kept across a killed run so a fit can resume
        from its checkpoints; `context.callbacks` go to its Ray Train RunConfigs."""

    @abstractmethod
    def evaluate(self, real: Any, model: Any) -> dict[str, float]:
        """Metrics on REAL held-out data (or the exact truth), never on samples."""

    @abstractmethod
    def sample(self, real: Any, model: Any, n: int, seed: int) -> pa.Table: ...

    def sample_to(self, real: Any, model: Any, n: int, seed: int, directory: "Location",
                  progress: "Location | None" = None) -> tuple[dict[str, float], dict[str, str]]:
        """Write the corpus that sample() makes into `directory` as corpus shards (rows
        numbered by `_row`); return its statistics and metadata. Families whose corpora
        are large (the language models) write straight from where samples are made, and
        their samplers write how far they got into the directory `progress`
        (engine/progress.py); the rest write the table sample() returns."""
        from engine.corpus import write_table_into

        table = self.sample(real, model, n, seed)
        write_table_into(table, directory)
        metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        return self.sample_stats(table), metadata

    @abstractmethod
    def save_model(self, model: Any, directory: Path) -> None:
        """Write the model into a local directory (the chain puts it in the run)."""

    @abstractmethod
    def load_model(self, directory: "Location") -> Any:
        """The model the chain saved, from the run's storage (`engine.files.local_copy`
        gives a local directory with its files)."""

    @abstractmethod
    def cost(self) -> "Cost":
        """Rows per generation and, for token models, tokens per row and parameter
        count — for `collapse run --dry-run`, without running."""

    @abstractmethod
    def model_name(self) -> str: ...

    # ------------------------------------------------- optional, with defaults
    def prepare(self, seed: int, cache_dir: "Location") -> str | None:
        """Work on real data done once per study before any chain starts (the LM family
        tokenizes its corpus with Ray Data into `cache_dir`); real_data() then reads it.
        Returns a line saying what it prepared, or None when there was nothing to do."""
        return None

    def fit_params(self) -> dict[str, Any]:
        """The parameters a fit reads (role `fit`, see ROLES): chains whose grid points
        agree on them (and on the data) train the same generation-1 model, which is then
        fit once and shared."""
        fitted = {f.name for f in dataclasses.fields(self.config) if role(f) == "fit"}
        return {k: v for k, v in dataclasses.asdict(self.config).items() if k in fitted}

    def draw_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Those of `params` a chain's random draws are derived from: all but what only
        the fits after generation 1 read (role later_fits), so chains that differ only
        in those sample one generation-1 corpus and draw common random numbers after.
        (Placement parameters stay in, though they change no number: leaving them out
        would change the draws of every chain that states one, the quickstart's too.)"""
        later = {f.name for f in dataclasses.fields(self.config) if role(f) == "later_fits"}
        return {k: v for k, v in params.items() if k not in later}

    def stated(self, params: dict[str, Any]) -> dict[str, Any]:
        """`params` less those at their default: what a chain's random draws are derived
        from, so that a parameter added to the family later (with a default that keeps
        the old behaviour) changes no existing chain's seeds or results."""
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING
                    else f.default_factory() for f in dataclasses.fields(self.Config)
                    if f.default is not dataclasses.MISSING
                    or f.default_factory is not dataclasses.MISSING}
        return {k: v for k, v in params.items()
                if k not in defaults or v != defaults[k]}

    def validate(self) -> None:
        """Cross-field checks on one concrete grid point; raise ParamError."""

    def temperature(self) -> float | None:
        return None

    def theory(self, strategy: str, generation: int) -> float | None:
        """The closed form of the `theory_for` metric, where the family has one."""
        return None

    def sample_stats(self, table: pa.Table) -> dict[str, float]:
        """Metrics of a freshly sampled corpus (diversity...); stored in its manifest entry."""
        return {}

    def compare(self, real: Any, first_model: Callable[[], Any], model: Any,
                corpus: "CorpusView | None"
                ) -> tuple[dict[str, float], dict[str, dict]]:
        """Generation g measured against references after it sampled: generation 1
        (Shumailov et al. 2024 score each generation's samples under the first model)
        or the real data (the image families' Fréchet distance). Returns metrics for the
        table, and histograms {name: {"edges": [...], "counts": [...]}} that `collapse
        plot` draws per generation. `first_model()` loads generation 1's model;
        `corpus` is generation g's sampled corpus (engine.corpus.CorpusView: a Ray
        Dataset, or its first rows), None when it was not sampled. Default: nothing."""
        return {}, {}

    def curves(self, model: Any) -> dict[str, list[tuple[int, float]]]:
        """Per-step curves of a fit (e.g. train_loss), recorded with their steps."""
        return {}

    def data_view(self) -> Literal["table", "dataset", "stream"]:
        """How fit() wants its mix: a pyarrow Table in memory, a streamed Ray Dataset,
        or its files read one at a time in this process (engine.corpus.MixStream)."""
        return "table"

    def placement(self) -> list[Processes]:
        """The processes a chain starts besides its driver (trainer workers, sampler
        actors): the one place a family says so. A study is refused before it starts if
        one fits on no node; what a chain holds (chain_cpus, chain_gpus) and whether it
        starts Ray processes of its own follow from it."""
        return []

    def chain_memory(self) -> int:
        """Bytes a chain's driver process needs at most (its real data, its models, the
        mixes it reads in memory): the default of resources.memory_per_trial."""
        return 1 << 30

    def chain_cpus(self) -> float:
        """CPUs a running chain holds at most beyond its driver (from placement())."""
        return held(self.placement(), "CPU")

    def chain_gpus(self) -> float:
        """GPUs a running chain holds at most beyond its driver (from placement())."""
        return held(self.placement(), "GPU")


def error_growth(strategy: str, generation: int) -> float | None:
    """The factor by which an estimator's error at `generation` exceeds generation 1's
    when each generation refits to the previous fit's samples (exact for least squares
    and Gaussian means; the limit for other MLEs): g under replace, Σ 1/i² ≤ π²/6
    under accumulate, Σ 1/i under replace_multiple. None for other strategies."""
    import numpy as np

    i = np.arange(1, generation + 1, dtype=float)
    return {"replace": float(generation),
            "accumulate": float(np.sum(1 / i**2)),
            "replace_multiple": float(np.sum(1 / i))}.get(strategy)


def config_fields(family: type[Family]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(family.Config))


def row_weights(mix: pa.Table) -> np.ndarray | None:
    """Each row's loss weight in a weighted mix (corpus.WEIGHT, a workflow's `weights`:
    mean 1 over the mix), or None when every row counts the same."""
    from engine.corpus import WEIGHT

    if WEIGHT not in mix.column_names:
        return None
    return mix.column(WEIGHT).to_numpy()


TRUNCATED_CE = "truncated_ce"


def truncation_threshold(definition: Any) -> float | None:
    """The threshold γ of a study's `loss: {name: truncated_ce, threshold: γ}` (Shabgahi
    et al. 2025, "ForTIFAI"), or None for `loss: null` (the family's plain loss); a
    ParamError naming `loss` for anything else. Shared by the families whose loss is a
    cross-entropy (the language models' tokens, the VAE's pixels)."""
    if definition is None:
        return None
    if not isinstance(definition, dict) or definition.get("name") != TRUNCATED_CE:
        raise ParamError("loss", f"expected null or {{name: {TRUNCATED_CE}, threshold: γ}}, "
                                 f"got {definition!r}")
    extra = set(definition) - {"name", "threshold"}
    if extra:
        raise ParamError("loss", f"unknown key {sorted(extra)[0]!r} (allowed: name, threshold)")
    threshold = definition.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not 0 < threshold <= 1:
        raise ParamError("loss.threshold", f"expected a probability in (0, 1], got "
                                           f"{threshold!r}")
    return float(threshold)
