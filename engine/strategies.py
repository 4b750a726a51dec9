"""Data strategies: which corpora train generation g, and how much the new model samples.

A strategy is a pure function of (generation, rows per generation T). It only counts
rows; it never touches files, models or Ray. Generation 1 always trains on real data
alone. Sources are named by `Source`: real chunk k (k = 1 is the study's real training
set; later chunks are fresh real data) or the synthetic corpus sampled by the model of
generation k.

    replace                     gen g trains on the T samples of model g-1
    accumulate                  real + every earlier generation's samples (g·T rows)
    replace_multiple            g·T samples of model g-1 (pure synthetic, accumulated size)
    subsample                   T rows drawn without replacement from the accumulated pool
    subsample_with_replacement  T rows drawn with replacement from the accumulated pool
    accumulate_fresh_real       accumulate, plus T fresh real rows each generation

Beside these names, a study defines its own **workflows** (`workflow()`): from
generation 2 on, generation g trains on R(g) real rows plus S(g) samples of model g-1,
each amount a fraction or a count with a schedule over generations (constant, linear or
exponential decay), the real rows the same each generation, fresh, or growing:

    {name: real_half, real: {fraction: 0.5}}                           Bertrand et al. 2024
    {name: real_decay, real: {fraction: 0.5, schedule: exponential, decay: 0.5}}
    {name: thrive, real: {rows: 1000}, synthetic: {rows: 4000}}        Kazdan et al. 2024
    {name: fresh_loop, real: {fraction: 0.5}, real_data: fresh}        Alemohammad et al. 2023
    {name: strong, real: {fraction: 1.0}, real_data: growing,
     synthetic: {fraction: 0.1}}                                       Dohmatob et al. 2024

A strategy that reads fresh real data needs T real rows per chunk: T is the family's
stated rows per generation, never silently shrunk to fit (the family's real data refuses
too few rows with the field to change).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal
from engine.errors import BadInput, CollapseError, UnknownName

Draw = Literal["all", "without_replacement", "with_replacement"]
SCHEDULES = ("constant", "linear", "exponential")
REAL_DATA = ("same", "fresh", "growing")


@dataclass(frozen=True, order=True)
class Source:
    kind: Literal["real", "synthetic"]
    index: int  # real chunk number (1-based), or the generation whose model sampled it

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index:04d}"


def real(chunk: int = 1) -> Source:
    return Source("real", chunk)


def synthetic(generation: int) -> Source:
    return Source("synthetic", generation)


@dataclass(frozen=True)
class Part:
    source: Source
    rows: int  # rows of that source the mix uses (its first `rows` rows)


@dataclass(frozen=True)
class Mix:
    """A training mix: the pool (parts) and how the training rows are drawn from it."""

    parts: tuple[Part, ...]
    draw: Draw = "all"
    rows: int = 0  # rows drawn when draw != "all"; for "all", the pool's size
    # Loss weights (real, synthetic): each kind's share of the training objective, as
    # He, Xu & Cheng 2025 weight them. None: every row counts the same.
    weights: tuple[float, float] | None = None

    @property
    def pool_rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def row_weights(self, rows_of: dict[str, int]) -> dict[str, float] | None:
        """Each kind's per-row weight, given the mix's rows of each kind: the objective
        is w_real · (mean loss over real rows) + w_synthetic · (mean loss over synthetic
        rows), scaled so a row weighs 1 on average (the loss keeps its size: a learning
        rate or ridge tuned without weights still fits). A kind with no rows in the mix
        (generation 1's real-only mix) drops out. None: unweighted."""
        if self.weights is None:
            return None
        present = {k: w for k, w in zip(("real", "synthetic"), self.weights) if rows_of.get(k)}
        total_rows, total_weight = sum(rows_of[k] for k in present), sum(present.values())
        return {k: w * total_rows / (rows_of[k] * total_weight) for k, w in present.items()}


@dataclass(frozen=True)
class Strategy:
    name: str
    mix: Callable[[int, int], Mix]  # (generation, T) -> training mix
    sample_size: Callable[[int, int], int]  # (generation, T) -> rows model g samples
    description: str
    fresh_real: bool = False  # reads real chunk g at generation g (else chunk 1 only)

    def real_chunks(self, generations: int) -> int:
        """How many real chunks (of T rows each) a chain of this length reads."""
        return generations if self.fresh_real else 1


def _check(g: int, T: int) -> None:
    if g < 1:
        raise ValueError(f"generation must be >= 1, got {g}")
    if T < 1:
        raise ValueError(f"rows per generation must be >= 1, got {T}")


def _whole(parts: list[Part]) -> Mix:
    return Mix(tuple(parts), "all", sum(p.rows for p in parts))


def _accumulated_pool(g: int, T: int) -> list[Part]:
    return [Part(real(1), T)] + [Part(synthetic(k), T) for k in range(1, g)]


def _replace(g: int, T: int) -> Mix:
    _check(g, T)
    return _whole([Part(real(1), T)] if g == 1 else [Part(synthetic(g - 1), T)])


def _accumulate(g: int, T: int) -> Mix:
    _check(g, T)
    return _whole(_accumulated_pool(g, T))


def _replace_multiple(g: int, T: int) -> Mix:
    _check(g, T)
    # The i-th model fits i·T samples of model i-1 (Gerstgrasser et al., App. E).
    return _whole([Part(real(1), T)] if g == 1 else [Part(synthetic(g - 1), g * T)])


def _subsample(g: int, T: int) -> Mix:
    _check(g, T)
    if g == 1:
        return _whole([Part(real(1), T)])
    return Mix(tuple(_accumulated_pool(g, T)), "without_replacement", T)


def _subsample_with_replacement(g: int, T: int) -> Mix:
    _check(g, T)
    if g == 1:
        return _whole([Part(real(1), T)])
    return Mix(tuple(_accumulated_pool(g, T)), "with_replacement", T)


def _accumulate_fresh_real(g: int, T: int) -> Mix:
    _check(g, T)
    return _whole([Part(real(k), T) for k in range(1, g + 1)]
                  + [Part(synthetic(k), T) for k in range(1, g)])


def _same_size(g: int, T: int) -> int:
    _check(g, T)
    return T


def _next_multiple(g: int, T: int) -> int:
    _check(g, T)
    return (g + 1) * T  # model g feeds generation g+1, which fits (g+1)·T rows


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("replace", _replace, _same_size,
                 "train only on the previous model's T samples"),
        Strategy("accumulate", _accumulate, _same_size,
                 "real data plus every earlier generation's samples"),
        Strategy("replace_multiple", _replace_multiple, _next_multiple,
                 "g·T samples of the previous model, pure synthetic"),
        Strategy("subsample", _subsample, _same_size,
                 "T rows drawn without replacement from the accumulated pool"),
        Strategy("subsample_with_replacement", _subsample_with_replacement, _same_size,
                 "T rows drawn with replacement from the accumulated pool"),
        Strategy("accumulate_fresh_real", _accumulate_fresh_real, _same_size,
                 "accumulate, plus T fresh real rows each generation", fresh_real=True),
    ]
}


class WorkflowError(CollapseError, ValueError):
    """A workflow definition problem: `field` (dotted, inside the definition) and why."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class Amount:
    """Rows per generation from generation 2 on: a fraction or a count, times a schedule.
    decay: linear loses `decay` of the start each generation (0.25: none left at
    generation 6); exponential keeps (1 - decay) of the last generation's amount."""

    fraction: float | None = None
    rows: int | None = None
    schedule: str = "constant"
    decay: float = 0.0

    def scale(self, g: int) -> float:
        steps = g - 2  # generation 2 gets the amount as stated
        if self.schedule == "linear":
            return max(0.0, 1.0 - self.decay * steps)
        if self.schedule == "exponential":
            return (1.0 - self.decay) ** steps
        return 1.0

    def describe(self, of: str) -> str:
        base = f"{self.fraction:g} of {of}" if self.fraction is not None else f"{self.rows} rows"
        return base if self.schedule == "constant" else \
            f"{base}, {self.schedule} decay {self.decay:g} per generation"


def _amount(definition: Any, where: str, fraction_max: float) -> Amount:
    if not isinstance(definition, dict):
        raise WorkflowError(where, f"expected a mapping such as {{fraction: 0.5}} or "
                                   f"{{rows: 1000}}, got {definition!r}")
    known = ("fraction", "rows", "schedule", "decay")
    for key in definition:
        if key not in known:
            raise WorkflowError(f"{where}.{key}", f"unknown key (allowed: {', '.join(known)})")
    fraction, rows = definition.get("fraction"), definition.get("rows")
    if (fraction is None) == (rows is None):
        raise WorkflowError(where, "give exactly one of `fraction` and `rows`")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 <= fraction <= fraction_max):
        raise WorkflowError(f"{where}.fraction", f"expected a number in [0, {fraction_max:g}], "
                                                 f"got {fraction!r}")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise WorkflowError(f"{where}.rows", f"expected an integer >= 0, got {rows!r}")
    schedule = definition.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise WorkflowError(f"{where}.schedule", f"unknown schedule {schedule!r} "
                                                 f"(known: {', '.join(SCHEDULES)})")
    decay = definition.get("decay", 0.0)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
        raise WorkflowError(f"{where}.decay", f"expected a number in [0, 1], got {decay!r}")
    if schedule == "constant" and decay:
        raise WorkflowError(f"{where}.decay", "a constant schedule has no decay; "
                                              "add schedule: linear or exponential")
    return Amount(None if fraction is None else float(fraction), rows, schedule, float(decay))


def _weights(definition: Any) -> tuple[float, float]:
    if not isinstance(definition, dict) or set(definition) != {"real", "synthetic"}:
        raise WorkflowError("weights", f"expected {{real: w, synthetic: w}} (each kind's "
                                       f"share of the loss), got {definition!r}")
    for kind, w in definition.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
            raise WorkflowError(f"weights.{kind}", f"expected a number >= 0, got {w!r}")
    if definition["real"] + definition["synthetic"] <= 0:
        raise WorkflowError("weights", "at least one weight must be above 0")
    return float(definition["real"]), float(definition["synthetic"])


def _workflow_fields(name: str, definition: dict[str, Any]):
    """A workflow definition's checked fields: (real amount, real_data, synthetic
    amount or None, loss weights or None)."""
    known = ("name", "real", "real_data", "synthetic", "weights")
    for key in definition:
        if key not in known:
            raise WorkflowError(key, f"unknown key (allowed: {', '.join(known)})")
    if name in STRATEGIES:
        raise WorkflowError("name", f"{name!r} is a built-in strategy; name yours otherwise")
    if "real" not in definition:
        raise WorkflowError("real", "missing: the real rows each generation, e.g. "
                                    "{fraction: 0.5} (of T) or {rows: 1000}")
    real_amount = _amount(definition["real"], "real", 1.0)
    real_data = definition.get("real_data", "same")
    if real_data not in REAL_DATA:
        raise WorkflowError("real_data", f"unknown {real_data!r} (known: {', '.join(REAL_DATA)})")
    synthetic_amount = (None if definition.get("synthetic") is None
                        else _amount(definition["synthetic"], "synthetic", 0.999))
    if synthetic_amount is None and real_data == "growing":
        raise WorkflowError("synthetic", "growing real data has no `rest of T`; give the "
                                         "synthetic share, e.g. {fraction: 0.1}, or {rows: N}")
    weights = _weights(definition["weights"]) if "weights" in definition else None
    return real_amount, real_data, synthetic_amount, weights


def workflow(name: str, definition: dict[str, Any]) -> Strategy:
    """A study's own strategy (see the module doc). Generation 1 trains on T real rows;
    generation g >= 2 on R(g) real rows and S(g) samples of model g-1, where

        real: {fraction | rows, schedule, decay}   R(g): a fraction of T, or rows
        real_data: same | fresh | growing          chunk 1's first R(g) rows each time;
                                                   R(g) rows of a new chunk; or every
                                                   real row so far (chunk 1 and R(k)
                                                   rows of chunk k, k = 2..g)
        synthetic: {fraction | rows, ...}          S(g): the synthetic share of the mix
                                                   (fraction < 1), or rows; left out:
                                                   the rest of T, so a generation is T rows
        weights: {real: w, synthetic: w}           each kind's share of the loss from
                                                   generation 2 on (He, Xu & Cheng 2025);
                                                   left out: every row the same

    Raises WorkflowError naming the field inside the definition."""
    real_amount, real_data, synthetic_amount, weights = _workflow_fields(name, definition)

    def real_rows(g: int, T: int) -> int:
        a = real_amount
        return round((a.fraction * T if a.fraction is not None else a.rows) * a.scale(g))

    def real_parts(g: int, T: int) -> list[Part]:
        if real_data == "growing":
            parts = [Part(real(1), T)] + [Part(real(k), real_rows(k, T)) for k in range(2, g + 1)]
        else:
            parts = [Part(real(g if real_data == "fresh" else 1), real_rows(g, T))]
        for p in parts:
            if p.rows > T:
                raise BadInput(f"strategy {name}: real: {p.rows} rows at generation {g} "
                                 f"exceed a real chunk's T = {T} rows")
        return [p for p in parts if p.rows]

    def synthetic_rows(g: int, T: int) -> int:
        a = synthetic_amount
        if a is None:
            rows = T - real_rows(g, T)
        elif a.fraction is not None:  # the synthetic share of the whole mix
            share = a.fraction * a.scale(g)
            rows = round(share / (1 - share) * sum(p.rows for p in real_parts(g, T)))
        else:
            rows = round(a.rows * a.scale(g))
        if rows < 1:
            raise BadInput(f"strategy {name}: generation {g} gets no synthetic rows at "
                             f"T = {T} (real: {real_rows(g, T)} rows); that is training on "
                             "real data alone: lower the real amount or state `synthetic`")
        return rows

    def mix(g: int, T: int) -> Mix:
        _check(g, T)
        if g == 1:
            return _whole([Part(real(1), T)])
        mixed = _whole(real_parts(g, T) + [Part(synthetic(g - 1), synthetic_rows(g, T))])
        return mixed if weights is None else dataclasses.replace(mixed, weights=weights)

    def sample_size(g: int, T: int) -> int:
        _check(g, T)
        return synthetic_rows(g + 1, T)  # model g feeds generation g+1

    synthetic_text = ("the rest of T" if synthetic_amount is None
                      else synthetic_amount.describe("the mix"))
    description = (f"real: {real_amount.describe('T')} ({real_data}); synthetic: "
                   f"{synthetic_text}, sampled by the previous model"
                   + ("" if weights is None else
                      f"; loss weights real {weights[0]:g}, synthetic {weights[1]:g}"))
    return Strategy(name, mix, sample_size, description, fresh_real=real_data != "same")


def resolve(name: str, definition: dict[str, Any] | None = None) -> Strategy:
    """A built-in strategy by name, or the study's own from its definition."""
    return get(name) if definition is None else workflow(name, definition)


def get(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownName(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None
