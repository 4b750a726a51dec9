"""Kernel density estimation chains (Kazdan et al. 2024, "Collapse or Thrive?").

Data (`data`): `mixture`, a mixture of `components` Gaussians in d dimensions with a
known density (means on a circle of radius 3 in the first two coordinates, unit
covariance, equal weights); or `digits`, the handwritten-digit scans that ship with
scikit-learn projected on their first d principal components (the 8×8 pixels in
[0, 1]; the components fit once to every scan), real data with no known density: each
trial draws its own real chunks from the scans not held out, and `test_points` held-out
scans are every trial's test set.
Each generation fits a Gaussian KDE to its mix, a kernel on every row, and samples the
next corpus from it (a row drawn uniformly, plus kernel noise). `trials` independent
chains run together as batched arrays.

Bandwidth: `scott` (kernel covariance n^(-2/(d+4)) times the data's covariance, as
scipy.stats.gaussian_kde), `silverman` ((n(d+2)/4)^(-2/(d+4)) times it), or a number h
(kernel covariance h²·I), n the rows of the mix.

Metrics, averaged over trials, on `test_points` held-out draws of the truth:
- `test_nll`   −mean log f̂(x): the fitted KDE's negative log-likelihood (nats)
- `truth_nll`  −mean log p(x) on the same points: the floor, the truth's entropy
               estimate (drawn as a reference line under test_nll)
- `excess_nll` test_nll − truth_nll: a Monte-Carlo estimate of KL(p ‖ f̂)
- `spread`     the mix's mean squared distance from its mean over the truth's: 1 for
               the truth's own draws; sampling from a KDE adds kernel noise each
               generation, so replace's spread grows
On the digits, where the density is unknown, `truth_nll` and `excess_nll` are left out
and `spread` is over the held-out scans' own.

Kazdan et al. find replace degrades without bound, accumulate stays bounded, and
subsampling a fixed budget from the accumulated pool degrades, slowly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.families.base import Family, ParamError, Presentation, row_weights
from engine.families.gaussian import points_table
from engine.files import local_copy
from engine.seeds import derive_seed

RADIUS = 3.0  # the components' means lie on a circle of this radius
EVAL_CHUNK = 2_000_000  # (test point, kernel) pairs per batch of the log-density


@dataclass
class KDEModel:
    points: np.ndarray  # (trials, m, d): the kernels' centres, the mix's rows
    weights: np.ndarray  # (m,): each kernel's share (the mix's row weights), sums to 1
    cov: np.ndarray  # (trials, d, d): the kernel covariance


@dataclass
class KDEReal:
    train_chunks: list[pa.Table]
    test: np.ndarray  # (trials, test_points, d): held-out draws of the truth
    spread: float | None = None  # the real data's spread (None: the mixture's, known)


MIXTURE, DIGITS = "mixture", "digits"
DIGIT_PIXELS = 64  # 8×8 scans: at most 64 principal components
_DIGIT_SCANS = 1797  # scikit-learn's digits


def digit_components(d: int) -> np.ndarray:
    """Every digit scan (pixels in [0, 1]) on its first d principal components,
    (1797, d): centred on the scans' mean, projected on the top right-singular vectors."""
    from engine.families.images import load_images

    scans = load_images(DIGITS, 8, 1).reshape(-1, DIGIT_PIXELS).astype(np.float64)
    centred = scans - scans.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:d].T


def _mixture_means(components: int, d: int) -> np.ndarray:
    angle = 2 * np.pi * np.arange(components) / components
    means = np.zeros((components, d))
    means[:, 0], means[:, 1] = RADIUS * np.cos(angle), RADIUS * np.sin(angle)
    return means


def _log_normal(x: np.ndarray, centres: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """log N(x; centre, L Lᵀ) for every x (t, a, d) and centre (t, b, d): (t, a, b)."""
    d = x.shape[-1]
    inv = np.linalg.inv(chol)  # (t, d, d)
    zx = np.einsum("tij,taj->tai", inv, x)
    zc = np.einsum("tij,tbj->tbi", inv, centres)
    sq = (np.sum(zx ** 2, -1)[:, :, None] + np.sum(zc ** 2, -1)[:, None, :]
          - 2 * np.einsum("tai,tbi->tab", zx, zc))
    log_det = 2 * np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
    return -0.5 * (np.maximum(sq, 0) + d * np.log(2 * np.pi) + log_det[:, None, None])


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = a.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(a - top), axis=axis))


class KDE(Family):
    name = "kde"
    metrics = ("test_nll", "excess_nll", "truth_nll", "spread")  # headline first
    presentation = Presentation(reference_lines={"test_nll": "truth_nll"})
    weighted_fit = True

    @dataclass(frozen=True)
    class Config:
        data: str = MIXTURE  # mixture: the known Gaussian mixture; digits: the digit scans' first d principal components
        d: int = 2  # dimension
        components: int = 4  # Gaussians in the true mixture (means on a circle)
        n: int = 200  # rows of real data per generation (T)
        bandwidth: str | float = "scott"  # scott, silverman, or a fixed kernel width h
        test_points: int = 500  # held-out draws of the truth per trial
        trials: int = 100  # independent chains averaged in every metric

    def chain_memory(self) -> int:
        """Bytes a chain's driver holds: mixes of up to ~10·n rows per trial, the test
        points, and the log-density's batches; plus 1 GiB for the process."""
        p = self.config
        return (1 << 30) + 8 * p.trials * p.d * (12 * p.n + p.test_points) + 8 * 3 * EVAL_CHUNK

    def validate(self) -> None:
        p = self.config
        for name, low in (("d", 2), ("components", 1), ("n", 2), ("test_points", 1),
                          ("trials", 1)):
            if getattr(p, name) < low:
                raise ParamError(name, f"must be >= {low}, got {getattr(p, name)}")
        if p.data not in (MIXTURE, DIGITS):
            raise ParamError("data", f"expected {MIXTURE} or {DIGITS}, got {p.data!r}")
        if p.data == DIGITS:
            if p.d > DIGIT_PIXELS:
                raise ParamError("d", f"the digits have {DIGIT_PIXELS} pixels, so at most "
                                      f"{DIGIT_PIXELS} principal components; got {p.d}")
            if p.test_points >= _DIGIT_SCANS:
                raise ParamError("test_points", f"must be below the {_DIGIT_SCANS} digit "
                                                f"scans, got {p.test_points}")
        b = p.bandwidth
        if isinstance(b, str) and b not in ("scott", "silverman"):
            raise ParamError("bandwidth", f"expected scott, silverman or a number > 0, got {b!r}")
        if not isinstance(b, str) and not (isinstance(b, (int, float)) and 0 < b < float("inf")):
            raise ParamError("bandwidth", f"expected scott, silverman or a number > 0, got {b!r}")

    def _points(self, table: pa.Table) -> np.ndarray:
        p = self.config
        x = table.column("x").combine_chunks().flatten().to_numpy().reshape(-1, p.trials, p.d)
        return np.ascontiguousarray(x.transpose(1, 0, 2))  # (trials, rows, d)

    def _truth_draws(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """(rows, trials, d) draws of the true mixture."""
        p = self.config
        which = rng.integers(p.components, size=(rows, p.trials))
        return _mixture_means(p.components, p.d)[which] + rng.standard_normal((rows, p.trials, p.d))

    def real_data(self, seed: int, chunks: int, cache_dir: Path | None = None) -> KDEReal:
        p = self.config
        if p.data == DIGITS:
            return self._digit_data(seed, chunks)
        train = [points_table(self._truth_draws(
            np.random.default_rng(derive_seed(seed, "real-chunk", k)), p.n))
            for k in range(1, chunks + 1)]
        test = self._truth_draws(np.random.default_rng(derive_seed(seed, "test")), p.test_points)
        return KDEReal(train, np.ascontiguousarray(test.transpose(1, 0, 2)))

    def _digit_data(self, seed: int, chunks: int) -> KDEReal:
        """The scans' principal components: `test_points` held out (the same for every
        trial), and each trial's chunks of n drawn from the rest in its own seeded order,
        without repeats (a fresh-data workflow's chunks are disjoint)."""
        p = self.config
        points = digit_components(p.d)
        order = np.random.default_rng(derive_seed(seed, "digits-split")).permutation(len(points))
        test, pool = points[order[:p.test_points]], points[order[p.test_points:]]
        if chunks * p.n > len(pool):
            raise ParamError("n", f"{chunks} real chunk(s) of n = {p.n} scans need "
                                  f"{chunks * p.n}; the digits hold {len(pool)} beside the "
                                  f"{p.test_points} held out: set n to at most "
                                  f"{len(pool) // chunks}")
        picks = np.stack([np.random.default_rng(derive_seed(seed, "digits-trial", t))
                          .permutation(len(pool))[:chunks * p.n] for t in range(p.trials)], 1)
        train = [points_table(pool[picks[k * p.n:(k + 1) * p.n]]) for k in range(chunks)]
        spread = float(np.sum((test - test.mean(axis=0)) ** 2, axis=1).mean())
        return KDEReal(train, np.ascontiguousarray(np.broadcast_to(test, (p.trials, *test.shape))),
                       spread=spread)

    def fit(self, real: KDEReal, mix: pa.Table, seed: int, context=None) -> KDEModel:
        x = self._points(mix)
        m, d = x.shape[1], x.shape[2]
        weight = row_weights(mix)
        weight = np.full(m, 1.0 / m) if weight is None else weight / weight.sum()
        b = self.config.bandwidth
        if isinstance(b, str):
            # the mix's (weighted) covariance, scaled as scipy's gaussian_kde does, with
            # Kish's effective sample size standing in for n when rows are weighted
            n_eff = 1.0 / np.sum(weight ** 2)
            factor = (n_eff ** (-1.0 / (d + 4)) if b == "scott"
                      else (n_eff * (d + 2) / 4.0) ** (-1.0 / (d + 4)))
            mean = np.einsum("m,tmd->td", weight, x)
            centred = x - mean[:, None, :]
            data_cov = np.einsum("m,tmi,tmj->tij", weight, centred, centred) / (
                1 - np.sum(weight ** 2))
            cov = data_cov * factor ** 2
        else:
            cov = np.broadcast_to(float(b) ** 2 * np.eye(d), (x.shape[0], d, d)).copy()
        return KDEModel(points=x, weights=weight, cov=cov)

    def log_density(self, model: KDEModel, x: np.ndarray) -> np.ndarray:
        """log f̂ at x (trials, a, d): (trials, a), in batches of test points."""
        chol = np.linalg.cholesky(model.cov)
        m = model.points.shape[1]
        step = max(1, EVAL_CHUNK // max(1, m * x.shape[0]))
        log_w = np.log(np.maximum(model.weights, 1e-300))
        return np.concatenate([
            _logsumexp(_log_normal(x[:, a:a + step], model.points, chol) + log_w, axis=2)
            for a in range(0, x.shape[1], step)], axis=1)

    def truth_log_density(self, x: np.ndarray) -> np.ndarray:
        p = self.config
        means = _mixture_means(p.components, p.d)
        sq = np.sum((x[:, :, None, :] - means[None, None]) ** 2, axis=-1)
        return _logsumexp(-0.5 * (sq + p.d * np.log(2 * np.pi)), axis=2) - np.log(p.components)

    def evaluate(self, real: KDEReal, model: KDEModel) -> dict[str, float]:
        p = self.config
        test_nll = -self.log_density(model, real.test).mean(axis=1)
        centred = model.points - np.einsum("m,tmd->td", model.weights, model.points)[:, None]
        spread = np.einsum("m,tm->t", model.weights, np.sum(centred ** 2, axis=-1))
        if real.spread is not None:  # real data: no known density to compare with
            return {"test_nll": float(test_nll.mean()),
                    "spread": float(spread.mean() / real.spread)}
        truth_nll = -self.truth_log_density(real.test).mean(axis=1)
        # the truth's spread: a component's unit variance in d directions plus the
        # means' RADIUS² (they average to 0)
        truth_spread = p.d + (RADIUS ** 2 if p.components > 1 else 0.0)
        return {"test_nll": float(test_nll.mean()), "truth_nll": float(truth_nll.mean()),
                "excess_nll": float((test_nll - truth_nll).mean()),
                "spread": float(spread.mean() / truth_spread)}

    def sample(self, real: KDEReal, model: KDEModel, n: int, seed: int) -> pa.Table:
        p = self.config
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(model.weights), size=(n, p.trials), p=model.weights)
        centres = model.points[np.arange(p.trials)[None, :], rows]  # (n, trials, d)
        chol = np.linalg.cholesky(model.cov)
        noise = np.einsum("tij,ntj->nti", chol, rng.standard_normal((n, p.trials, p.d)))
        return points_table(centres + noise)

    def save_model(self, model: KDEModel, directory: Path) -> None:
        np.savez(directory / "kde.npz", points=model.points, weights=model.weights,
                 cov=model.cov)

    def load_model(self, directory) -> KDEModel:
        with np.load(local_copy(directory) / "kde.npz") as f:
            return KDEModel(points=f["points"], weights=f["weights"], cov=f["cov"])

    def cost(self):
        from engine.plan import Cost

        p = self.config
        return Cost(rows_per_generation=p.n, tokens_per_row=None, parameters=None,
                    real_rows=_DIGIT_SCANS - p.test_points if p.data == DIGITS else None,
                    rows_field="n")

    def model_name(self) -> str:
        b = self.config.bandwidth
        data = "digits-" if self.config.data == DIGITS else ""
        return f"kde-{data}{self.config.d}d-{b if isinstance(b, str) else f'h{b:g}'}"
