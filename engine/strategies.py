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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

Draw = Literal["all", "without_replacement", "with_replacement"]


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

    @property
    def pool_rows(self) -> int:
        return sum(p.rows for p in self.parts)


@dataclass(frozen=True)
class Strategy:
    name: str
    mix: Callable[[int, int], Mix]  # (generation, T) -> training mix
    sample_size: Callable[[int, int], int]  # (generation, T) -> rows model g samples
    description: str

    def real_chunks(self, generations: int) -> int:
        """How many real chunks a chain of this length reads."""
        return max(
            (p.source.index for g in range(1, generations + 1)
             for p in self.mix(g, 1).parts if p.source.kind == "real"),
            default=1,
        )


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
                 "accumulate, plus T fresh real rows each generation"),
    ]
}


def get(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None
