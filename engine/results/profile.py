"""A collapse profile per strategy: how the headline metric grows over generations.

Schaeffer et al. (2025) ask collapse studies to say not only *whether* a metric rises
under a data strategy but *how*: without bound, slowing down, or towards a ceiling. For
each strategy (and grid point) the mean over seeds of a metric against generation g is
fitted three ways by least squares:

    linear        y = a + b·(g − 1)                 grows by b every generation
    logarithmic   y = a + b·ln g                    grows, ever more slowly
    bounded       y = c − (c − a)·exp(−k·(g − 1))   approaches c at rate k

and the form with the lowest corrected Akaike criterion (AICc: the residual error,
penalised by the parameters a form spends and the few points a study has) is named,
with its numbers and R². Bounded is named only where its fit has covered half its climb
within the generations seen: a far ceiling approached at a crawl is a straight climb
with a slight bend. With 5-6 generations a slowing climb is often called
logarithmic rather than bounded (its ceiling is not yet in sight); the seed paper's linear regression is the check: its exact
error grows linearly under replace and towards σ²d/(T−d−1)·π²/6 under accumulate.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

FORMS = ("linear", "logarithmic", "bounded")
# AICc needs more points than parameters + 1: the two-parameter forms are compared from
# 4 generations, the bounded form joins from 5.
MIN_GENERATIONS = 4


def _aicc(rss: float, n: int, k: int, scale: float) -> float:
    # A floor on the residual: a form that fits exactly (the closed forms) must not win
    # by log(0); among exact fits, the one with fewer parameters is named.
    rss = max(rss, 1e-12 * scale * n)
    if n - k - 1 <= 0:
        return math.inf
    return n * math.log(rss / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def _least_squares(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef, float(np.sum((design @ coef - y) ** 2))


def fit_forms(g: np.ndarray, y: np.ndarray) -> dict[str, dict]:
    """Each form's parameters, residual sum of squares and AICc for points (g, y)."""
    g, y = np.asarray(g, dtype=float), np.asarray(y, dtype=float)
    n, scale = len(g), max(float(np.var(y)), float(np.mean(y ** 2)), 1e-30)
    fits: dict[str, dict] = {}
    ones = np.ones_like(g)
    (a, b), rss = _least_squares(np.column_stack([ones, g - 1]), y)
    fits["linear"] = {"a": a, "b": b, "rss": rss, "aicc": _aicc(rss, n, 2, scale)}
    (a, b), rss = _least_squares(np.column_stack([ones, np.log(g)]), y)
    fits["logarithmic"] = {"a": a, "b": b, "rss": rss, "aicc": _aicc(rss, n, 2, scale)}
    fits["bounded"] = _fit_bounded(g, y, n, scale)
    return fits


def _fit_bounded(g: np.ndarray, y: np.ndarray, n: int, scale: float) -> dict:
    """y = c − (c − a)·exp(−k(g − 1)): for a fixed rate k the rest is linear, so the
    rate is searched on a grid and refined (no start values to guess, no divergence)."""
    best = None
    for k in np.concatenate([np.geomspace(1e-3, 20, 400)]):
        e = np.exp(-k * (g - 1))
        # y = c·(1 − e) + a·e
        (c, a), rss = _least_squares(np.column_stack([1 - e, e]), y)
        if best is None or rss < best["rss"]:
            best = {"a": a, "c": c, "k": float(k), "rss": rss}
    best["aicc"] = _aicc(best["rss"], n, 3, scale)
    return best


def named_forms(g: np.ndarray, fits: dict[str, dict]) -> tuple[str, ...]:
    """The forms that may be named: bounded only where its fit has covered at least half
    of its climb within the generations seen. A bounded fit with a far ceiling and a slow
    rate is a slight bend in a straight climb, not a limit in sight."""
    seen = 1.0 - math.exp(-fits["bounded"]["k"] * (g.max() - g.min()))
    return FORMS if seen >= 0.5 else ("linear", "logarithmic")


def describe(form: str, fit: dict) -> str:
    if form == "linear":
        return f"{fit['a']:.4g} {fit['b']:+.4g}·(g−1)"
    if form == "logarithmic":
        return f"{fit['a']:.4g} {fit['b']:+.4g}·ln g"
    return f"→ {fit['c']:.4g} from {fit['a']:.4g}, rate {fit['k']:.3g}/generation"


def profile(table: pd.DataFrame, metric: str, index: list[str]) -> pd.DataFrame:
    """One row per `index` group (strategy × grid axes): the form that fits the metric's
    mean over seeds against generation best, its formula, R², and each form's AICc."""
    rows = table[(table["metric"] == metric) & table["step"].isna()]
    out = []
    for key, group in rows.groupby(index, sort=False, dropna=False):
        curve = group.groupby("generation")["value"].mean().sort_index()
        record = dict(zip(index, key if isinstance(key, tuple) else (key,)))
        g, y = curve.index.to_numpy(dtype=float), curve.to_numpy(dtype=float)
        if len(g) < MIN_GENERATIONS:
            record.update({"profile": "n/a", "fit": f"{len(g)} generation(s): too few to "
                                                    f"tell the forms apart ({MIN_GENERATIONS} "
                                                    "needed)"})
            out.append(record)
            continue
        fits = fit_forms(g, y)
        form = min(named_forms(g, fits), key=lambda f: fits[f]["aicc"])
        total = float(np.sum((y - y.mean()) ** 2))
        r2 = 1.0 - fits[form]["rss"] / total if total > 0 else 1.0
        record.update({"profile": form, "fit": describe(form, fits[form]), "R²": round(r2, 4)})
        record.update({f"AICc {f}": round(fits[f]["aicc"], 1) for f in FORMS})
        out.append(record)
    return pd.DataFrame(out).set_index(index)
