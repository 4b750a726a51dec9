"""The one small interface every model family implements.

A family is the only place that knows what a sample is (a label vector, a point, a
story). The chain calls these functions in order and never looks inside their values.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from engine.files import Location


class ParamError(ValueError):
    """A family parameter is invalid. `field` is the parameter's name (e.g. "T")."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class Family(Protocol):
    name: str
    Params: type  # a dataclass; its fields are the study file's family parameters
    metrics: tuple[str, ...]  # what evaluate() returns; the first is the headline metric
    theory_for: str | None  # the metric that the `theory` metric predicts, if any

    def data_view(self, params: Any) -> Literal["table", "dataset"]:
        """How fit() wants its mix: a pyarrow Table in memory, or a streamed Ray Dataset."""

    def validate(self, params: Any) -> None:
        """Cross-field checks on one concrete grid point; raise ParamError."""

    def model_name(self, params: Any) -> str: ...

    def temperature(self, params: Any) -> float | None: ...

    def real_data(self, params: Any, seed: int, chunks: int, cache_dir: Path) -> Any:
        """The chain's real data, fixed by the study seed. Must expose
        `train_chunks: list[pa.Table]`, `chunks` tables of T rows each — T, the rows of
        one generation, is the unit every strategy counts in. The rest (held-out test
        data, fixed features, the true model) is the family's own business. `cache_dir`
        is shared by every chain of the study, for work done once (a tokenizer)."""

    def fit(self, params: Any, real: Any, mix: Any, seed: int, workdir: "Location") -> Any:
        """A fresh model fit to the mix. `workdir` is scratch space of this chain and
        generation alone, in the run's storage (engine.files.Location: a shared path or
        an object-store URI, so that Ray Train workers on any node reach it). It outlives
        a killed run, for a fit that resumes from its own checkpoints."""

    def evaluate(self, params: Any, real: Any, model: Any) -> dict[str, float]:
        """Metrics on REAL held-out data (or the exact truth), never on samples."""

    def theory(self, params: Any, strategy: str, generation: int) -> float | None: ...

    def sample(self, params: Any, real: Any, model: Any, n: int, seed: int) -> pa.Table: ...

    def sample_stats(self, params: Any, table: pa.Table) -> dict[str, float]:
        """Metrics of a freshly sampled corpus (diversity...); stored in its manifest entry."""

    def curves(self, model: Any) -> dict[str, list[tuple[int, float]]]:
        """Per-step curves of a fit (e.g. train_loss), recorded with their steps."""

    def preview(self, params: Any, table: pa.Table) -> Any:
        """A few of a corpus's samples as images, (k, H, W) or (k, H, W, 3) in [0, 1],
        for the sample grids of `collapse plot`. Optional: a family whose samples are
        not images leaves it out (the default is None, not a function)."""

    def chain_cpus(self, params: Any) -> float:
        """CPUs a running chain holds beyond its driver (trainer workers, sampler actors)."""

    def chain_gpus(self, params: Any) -> float:
        """GPUs a running chain holds at most (trainer workers or sampler actors)."""

    def placement(self, params: Any) -> list["Bundle"]:
        """The processes a chain starts besides its driver (trainer workers, sampler
        actors), each a Bundle; a study is refused before it starts if one fits on no
        node of the cluster."""

    def cost(self, params: Any) -> Any:
        """An engine.plan.Cost: rows per generation and, for token models, tokens per
        row and parameter count — for `collapse run --dry-run`, without running."""

    def save_model(self, model: Any, directory: Path) -> None:
        """Write the model into a local directory (the chain puts it in the run)."""

    def load_model(self, directory: "Location") -> Any:
        """The model the chain saved, from the run's storage; `engine.files.local_copy`
        gives a local directory with its files."""


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


@dataclass(frozen=True)
class Bundle:
    """One process's Ray resources, and the family parameter behind each amount (for
    the error that names the field when no node can hold it)."""

    what: str  # e.g. "trainer worker"
    resources: dict[str, float]  # Ray resource name -> amount
    fields: dict[str, str]  # Ray resource name -> family parameter


class ModuleFamily:
    """A family is a module of plain functions (engine/families/linear.py is the
    smallest). This wrapper is what the engine holds: it forwards to the module and
    answers for the optional parts a module leaves out."""

    def __init__(self, module: Any):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        if hasattr(self._module, name):
            return getattr(self._module, name)
        if hasattr(_Defaults, name):
            return getattr(_Defaults, name)
        raise AttributeError(f"family module {self._module.__name__} has no {name!r}")


class _Defaults:
    """What a family without per-step curves, sample statistics or token costs does."""

    theory_for: str | None = None
    paper_table = False

    @staticmethod
    def data_view(params: Any) -> str:
        return "table"

    @staticmethod
    def theory(params: Any, strategy: str, generation: int) -> float | None:
        return None

    @staticmethod
    def sample_stats(params: Any, table: pa.Table) -> dict[str, float]:
        return {}

    @staticmethod
    def curves(model: Any) -> dict[str, list[tuple[int, float]]]:
        return {}

    @staticmethod
    def temperature(params: Any) -> float | None:
        return None

    preview = None  # families whose samples are not images draw no previews

    @staticmethod
    def chain_cpus(params: Any) -> float:
        return 0.0

    @staticmethod
    def chain_gpus(params: Any) -> float:
        return 0.0

    @staticmethod
    def placement(params: Any) -> list[Bundle]:
        return []
