"""Linear regression, the seed paper's §3 setting (Gerstgrasser et al. 2024).

Each chain holds `trials` independent regressions computed together as batched linear
algebra. Per regression: features X ~ N(0, I_d) (T rows, drawn once per chain and kept),
a true w* ~ N(0, I_d), real labels y = X w* + N(0, σ²). A synthetic sample of n rows
gives row j the kept feature row j mod T and the label x·ŵ + N(0, σ²) from the previous
fit — so a "sample" is a label vector, and the corpus stores labels only.

Metric `test_error` = mean over trials of ‖ŵ − w*‖², exact (no test-set noise), and
`theory` = its closed form: σ²d/(T−d−1) times n (replace), Σ 1/i² (accumulate) or
Σ 1/i (replace_multiple).
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
class LinearReal:
    X: np.ndarray  # (trials, T, d) features, fixed for the whole chain
    w_star: np.ndarray  # (trials, d)
    train_chunks: list[pa.Table]  # chunk k: T rows of real labels (fresh noise per chunk)
    # (XᵀX)⁻¹Xᵀ, (trials, d, T): X never changes within a chain, so a mix that holds
    # every feature row equally often (replace, accumulate, replace_multiple) is fit
    # with one product instead of forming and solving the normal equations again.
    ols_operator: np.ndarray | None = None


def labels_table(feature: np.ndarray, y: np.ndarray) -> pa.Table:
    """Rows: one sample each; `y` holds that sample's label in every trial."""
    n, trials = y.shape
    return pa.table({
        "feature": pa.array(feature.astype(np.int32)),
        "y": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(y).ravel()), trials),
    })


def labels_from_table(table: pa.Table, trials: int) -> tuple[np.ndarray, np.ndarray]:
    feature = table.column("feature").to_numpy()
    y = table.column("y").combine_chunks().flatten().to_numpy().reshape(-1, trials)
    return feature, y


def sum_by_feature(feature: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per feature row k, the sum of the labels of the mix's rows with that feature."""
    if len(feature) == len(counts) and (feature == np.arange(len(counts))).all():
        return y  # one row per feature, in order: nothing to add up
    order = np.argsort(feature, kind="stable")
    present = np.flatnonzero(counts)
    starts = np.concatenate([[0], np.cumsum(counts[present])[:-1]]).astype(np.int64)
    sums = np.zeros((len(counts), y.shape[1]))
    sums[present] = np.add.reduceat(y[order], starts, axis=0)
    return sums


class Linear(Family):
    name = "linear"
    weighted_fit = True
    metrics = ("test_error", "test_error_stderr")  # the first is the headline
    theory_for = "test_error"

    @dataclass(frozen=True)
    class Config:
        d: int = 10  # feature dimension
        T: int = 100  # rows of real data per generation
        sigma2: float = 1.0  # label noise variance σ²
        ridge: float = 0.0  # λ in (XᵀX + λI)⁻¹Xᵀy; 0 is the paper's ordinary least squares
        trials: int = 2000  # independent regressions averaged in every metric

    def chain_memory(self) -> int:
        """Bytes a chain's driver holds: features X and the OLS operator (trials·T·d each), and a mix of up to ~10·T labels per trial, 8 bytes a number; plus 1 GiB for the process."""
        p = self.config
        return (1 << 30) + 8 * p.trials * p.T * (2 * p.d + 10)

    def validate(self) -> None:
        p = self.config
        for name, low in (("d", 1), ("T", 1), ("trials", 1)):
            if getattr(p, name) < low:
                raise ParamError(name, f"must be >= {low}, got {getattr(p, name)}")
        if p.sigma2 <= 0:
            raise ParamError("sigma2", f"must be > 0, got {p.sigma2}")
        if p.ridge < 0:
            raise ParamError("ridge", f"must be >= 0, got {p.ridge}")
        if p.ridge == 0 and p.T < p.d + 2:
            raise ParamError("T", f"must be >= d + 2 = {p.d + 2} for ordinary least squares "
                                  f"(its error σ²d/(T-d-1) is finite only then), got {p.T}; "
                                  "or set ridge > 0")

    def real_data(self, seed: int, chunks: int, cache_dir: Path | None = None) -> LinearReal:
        p = self.config
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((p.trials, p.T, p.d))
        w_star = rng.standard_normal((p.trials, p.d))
        clean = np.einsum("tkd,td->kt", X, w_star)  # (T, trials)
        feature = np.arange(p.T)
        train_chunks = []
        for k in range(1, chunks + 1):
            # Each chunk's noise has its own seed, so chunk 1 is the same however many
            # chunks a strategy needs: every strategy starts from identical real data.
            noise = np.random.default_rng(derive_seed(seed, "real-chunk", k)).standard_normal(clean.shape)
            train_chunks.append(labels_table(feature, clean + np.sqrt(p.sigma2) * noise))
        operator = None
        if p.ridge == 0:
            Xt = X.transpose(0, 2, 1)
            operator = np.linalg.solve(Xt @ X, Xt)
        return LinearReal(X=X, w_star=w_star, train_chunks=train_chunks, ols_operator=operator)

    def fit(self, real: LinearReal, mix: pa.Table, seed: int, context=None) -> np.ndarray:
        """Weighted least squares over the mix, batched over trials: a row with feature k
        contributes x_k x_kᵀ to the Gram matrix, so only per-feature counts and label sums
        are needed — one (trials, d, T) @ (trials, T, d) product instead of a loop."""
        p = self.config
        feature, y = labels_from_table(mix, p.trials)
        counts = np.bincount(feature, minlength=p.T).astype(float)  # (T,)
        weight = row_weights(mix)
        if weight is not None:  # a weighted mix: Σ w·x xᵀ and Σ w·x y, the same way
            label_sums = sum_by_feature(feature, y * weight[:, None], counts)
            counts = np.bincount(feature, weights=weight, minlength=p.T)
        else:
            label_sums = sum_by_feature(feature, y, counts)  # (T, trials)
        if real.ols_operator is not None and (counts == counts[0]).all():
            # Every feature row c times: ŵ = (c·XᵀX)⁻¹Xᵀs = (XᵀX)⁻¹Xᵀ(s/c).
            return (real.ols_operator @ (label_sums.T / counts[0])[:, :, None])[..., 0]
        Xt = real.X.transpose(0, 2, 1)  # (trials, d, T)
        gram = (Xt * counts[None, None, :]) @ real.X + p.ridge * np.eye(p.d)
        rhs = Xt @ label_sums.T[:, :, None]  # (trials, d, 1)
        if p.ridge == 0 and np.count_nonzero(counts) < p.d:
            # Fewer distinct feature rows than dimensions (possible when subsampling with
            # replacement): the normal equations are singular, so take the minimum-norm fit.
            return (np.linalg.pinv(gram) @ rhs)[..., 0]
        return np.linalg.solve(gram, rhs)[..., 0]

    def evaluate(self, real: LinearReal, w_hat: np.ndarray) -> dict[str, float]:
        err = np.sum((w_hat - real.w_star) ** 2, axis=1)
        return {"test_error": float(err.mean()),
                "test_error_stderr": float(err.std(ddof=1) / np.sqrt(len(err))) if len(err) > 1 else 0.0}

    def theory(self, strategy: str, generation: int) -> float | None:
        p = self.config
        if p.ridge != 0:
            return None
        factor = error_growth(strategy, generation)
        return None if factor is None else p.sigma2 * p.d / (p.T - p.d - 1) * factor

    def sample(self, real: LinearReal, w_hat: np.ndarray, n: int, seed: int) -> pa.Table:
        p = self.config
        feature = np.arange(n) % p.T
        mean = np.einsum("tkd,td->kt", real.X, w_hat)[feature]  # (n, trials)
        noise = np.random.default_rng(seed).standard_normal(mean.shape)
        return labels_table(feature, mean + np.sqrt(p.sigma2) * noise)

    def save_model(self, w_hat: np.ndarray, directory: Path) -> None:
        np.save(directory / "w_hat.npy", w_hat)

    def load_model(self, directory) -> np.ndarray:
        return np.load(local_copy(directory) / "w_hat.npy")

    def cost(self):
        from engine.plan import Cost

        return Cost(rows_per_generation=self.config.T, tokens_per_row=None, parameters=None)

    def model_name(self) -> str:
        return "ols" if self.config.ridge == 0 else "ridge"
