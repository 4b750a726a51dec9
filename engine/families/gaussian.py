"""Gaussian fitting, Shumailov et al.'s recursion, in 1-D and d-D.

Truth: N(0, I_d). Each generation fits the mean and the unbiased covariance to its mix
and samples the next corpus from N(μ̂, Σ̂). `trials` independent chains run together
as batched linear algebra.

Metrics, averaged over trials:
- `mean_error`      ‖μ̂ − μ‖²
- `variance_ratio`  mean_error divided by its generation-1 value E‖x̄ − μ‖² = d/n, exact
                    for real data. Replace grows like n; accumulate tends to π²/6
                    (Dey & Donoho); replace_multiple like Σ 1/i. `theory` gives these:
                    exact for replace and replace_multiple (E Σ̂ is a martingale), the
                    large-n limit Σ 1/i² for accumulate.
- `fitted_variance` median over trials of tr(Σ̂)/d — collapses towards 0 under
                    replace. The median, because the mean of Σ̂ is a martingale and
                    stays at 1 while almost every chain's variance shrinks.
- `w2_squared`      squared 2-Wasserstein distance to the truth:
                    ‖μ̂‖² + Σ_i (√λ_i(Σ̂) − 1)²
- `log_det_cov`     median over trials of log det Σ̂ (the truth's is 0): the volume
                    the fitted distribution spreads over, which collapse shrinks in
                    every direction at once; beside `fitted_variance` (the trace), the
                    two of Shumailov et al.'s covariance summaries.
- `trace_vs_first`  median over trials of tr(Σ̂_g) / tr(Σ̂_1): each chain's spread
                    against its own generation 1 (fit to real data), so the sampling
                    noise of generation 1 cancels; 1 at generation 1.
- `log_det_vs_first` median over trials of log det Σ̂_g − log det Σ̂_1 (the log of the
                    determinant's ratio); 0 at generation 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.families.base import Family, ParamError, error_growth, row_weights
from engine.files import local_copy
from engine.seeds import derive_seed



@dataclass
class GaussianModel:
    mean: np.ndarray  # (trials, d)
    cov: np.ndarray  # (trials, d, d)


@dataclass
class GaussianReal:
    train_chunks: list[pa.Table]


def points_table(x: np.ndarray) -> pa.Table:
    """x: (rows, trials, d). One row per sample; `x` holds it for every trial."""
    flat = pa.array(np.ascontiguousarray(x).ravel())
    return pa.table({"x": pa.FixedSizeListArray.from_arrays(flat, x.shape[1] * x.shape[2])})


class Gaussian(Family):
    name = "gaussian"
    weighted_fit = True
    metrics = ("variance_ratio", "mean_error", "fitted_variance", "w2_squared")  # headline first
    theory_for = "variance_ratio"

    @dataclass(frozen=True)
    class Config:
        d: int = 1  # dimension
        n: int = 100  # samples of real data per generation
        trials: int = 1000  # independent chains averaged in every metric

    def chain_memory(self) -> int:
        """Bytes a chain's driver holds: samples (trials·n·d) and a mix of up to ~10·n of them per trial, 8 bytes a number; plus 1 GiB for the process."""
        p = self.config
        return (1 << 30) + 8 * p.trials * p.n * p.d * 12

    def validate(self) -> None:
        p = self.config
        for name, low in (("d", 1), ("trials", 1)):
            if getattr(p, name) < low:
                raise ParamError(name, f"must be >= {low}, got {getattr(p, name)}")
        if p.n < p.d + 1:
            raise ParamError("n", f"must be >= d + 1 = {p.d + 1} for the covariance to be "
                                  f"estimable, got {p.n}")

    def _points(self, table: pa.Table) -> np.ndarray:
        p = self.config
        return table.column("x").combine_chunks().flatten().to_numpy().reshape(-1, p.trials, p.d)

    def real_data(self, seed: int, chunks: int, cache_dir: Path | None = None) -> GaussianReal:
        p = self.config
        return GaussianReal([
            points_table(np.random.default_rng(derive_seed(seed, "real-chunk", k))
                         .standard_normal((p.n, p.trials, p.d)))
            for k in range(1, chunks + 1)])

    def fit(self, real: GaussianReal, mix: pa.Table, seed: int, context=None) -> GaussianModel:
        x = self._points(mix)
        weight = row_weights(mix)
        if weight is None:
            mean = x.mean(axis=0)
            centered = x - mean
            cov = np.einsum("mti,mtj->tij", centered, centered) / (x.shape[0] - 1)
            return GaussianModel(mean=mean, cov=cov)
        # Weighted MLE of the mean; the covariance with reliability weights' correction
        # (Σw − Σw²/Σw), which is n − 1 when every weight is 1.
        total = weight.sum()
        mean = np.einsum("m,mti->ti", weight, x) / total
        centered = x - mean
        cov = np.einsum("m,mti,mtj->tij", weight, centered, centered) / (
            total - (weight ** 2).sum() / total)
        return GaussianModel(mean=mean, cov=cov)

    def evaluate(self, real: GaussianReal, model: GaussianModel) -> dict[str, float]:
        p = self.config
        mean_error = np.sum(model.mean**2, axis=1)  # the truth's mean is 0
        eig = np.clip(np.linalg.eigvalsh(model.cov), 0, None)
        w2 = mean_error + np.sum((np.sqrt(eig) - 1) ** 2, axis=1)
        return {
            "mean_error": float(mean_error.mean()),
            "variance_ratio": float(mean_error.mean() / (p.d / p.n)),
            "fitted_variance": float(np.median(np.trace(model.cov, axis1=1, axis2=2)) / p.d),
            "w2_squared": float(w2.mean()),
            "log_det_cov": float(np.median(np.linalg.slogdet(model.cov)[1])),
        }

    def compare(self, real: GaussianReal, first_model, model: GaussianModel,
                corpus) -> tuple[dict[str, float], dict[str, dict]]:
        first = first_model()
        trace = np.trace(model.cov, axis1=1, axis2=2) / np.trace(first.cov, axis1=1, axis2=2)
        log_det = np.linalg.slogdet(model.cov)[1] - np.linalg.slogdet(first.cov)[1]
        return {"trace_vs_first": float(np.median(trace)),
                "log_det_vs_first": float(np.median(log_det))}, {}

    def theory(self, strategy: str, generation: int) -> float | None:
        return error_growth(strategy, generation)

    def sample(self, real: GaussianReal, model: GaussianModel, n: int, seed: int) -> pa.Table:
        p = self.config
        # Symmetric square root via eigh: stays defined when a collapsing covariance
        # becomes numerically singular, where a Cholesky factorisation would fail.
        eig, vec = np.linalg.eigh(model.cov)
        root = vec * np.sqrt(np.clip(eig, 0, None))[:, None, :]  # (trials, d, d)
        z = np.random.default_rng(seed).standard_normal((n, p.trials, p.d))
        return points_table(model.mean[None] + np.einsum("tij,mtj->mti", root, z))

    def save_model(self, model: GaussianModel, directory: Path) -> None:
        np.savez(directory / "gaussian.npz", mean=model.mean, cov=model.cov)

    def load_model(self, directory) -> GaussianModel:
        with np.load(local_copy(directory) / "gaussian.npz") as f:
            return GaussianModel(mean=f["mean"], cov=f["cov"])

    def cost(self):
        from engine.plan import Cost

        return Cost(rows_per_generation=self.config.n, tokens_per_row=None, parameters=None)

    def model_name(self) -> str:
        return f"gaussian-{self.config.d}d"
