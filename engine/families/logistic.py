"""Logistic regression: Dey & Donoho's universality example of accumulation.

Each chain holds `trials` independent logistic regressions computed together. Per
regression: features X ~ N(0, I_d / d) (T rows, drawn once per chain and kept), a true
θ* with ‖θ*‖ = `signal`, real labels y ~ Bernoulli(σ(xᵀθ*)). A synthetic sample of n
rows gives row j the kept feature row j mod T and a label redrawn from the previous
fit, Bernoulli(σ(xᵀθ̂)) — so a "sample" is a label vector, and the corpus stores labels
only (as in the linear family).

Fit: maximum likelihood by Newton's method, batched across trials. A mix enters only
through per-feature-row counts and label sums, so its size does not matter.

Metrics: `param_error` = mean over trials of ‖θ̂ − θ*‖²; `variance_ratio` = that
divided by generation 1's value (the fit on the first real chunk, which every strategy
shares). For large T it tends to the linear-regression factors (universality): n under
replace, Σ 1/i² ≤ π²/6 under accumulate, Σ 1/i under replace_multiple; `theory` gives
those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.families.base import Family, ParamError, error_growth, row_weights
from engine.files import local_copy
from engine.families.linear import labels_from_table, labels_table, sum_by_feature
from engine.seeds import derive_seed



@dataclass
class LogisticReal:
    X: np.ndarray  # (trials, T, d) features, fixed for the whole chain
    theta_star: np.ndarray  # (trials, d)
    train_chunks: list[pa.Table]  # chunk k: T rows of real labels (fresh draws per chunk)
    first_error: float = field(default=float("nan"))  # generation 1's mean ‖θ̂ − θ*‖²


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow for large |z|


def _bernoulli(rng: np.random.Generator, prob: np.ndarray) -> np.ndarray:
    return (rng.random(prob.shape) < prob).astype(np.float64)


def _error(theta: np.ndarray, theta_star: np.ndarray) -> np.ndarray:
    return np.sum((theta - theta_star) ** 2, axis=1)


class Logistic(Family):
    name = "logistic"
    weighted_fit = True
    metrics = ("variance_ratio", "param_error", "param_error_stderr")  # headline first
    theory_for = "variance_ratio"

    @dataclass(frozen=True)
    class Config:
        d: int = 5  # feature dimension
        T: int = 500  # rows of real data per generation
        signal: float = 1.0  # ‖θ*‖: how far from a coin flip the labels are
        trials: int = 2000  # independent regressions averaged in every metric
        newton_steps: int = 25  # Newton iterations per fit (converges in well under 10 here)
        ridge: float = 1e-6  # keeps Newton defined where a small mix happens to be separable

    def chain_memory(self) -> int:
        """Bytes a chain's driver holds: features and the Newton step's matrices (trials·T·d), and a mix of up to ~10·T labels per trial, 8 bytes a number; plus 1 GiB for the process."""
        p = self.config
        return (1 << 30) + 8 * p.trials * p.T * (2 * p.d + 10)

    def validate(self) -> None:
        p = self.config
        for key, low in (("d", 1), ("trials", 1), ("newton_steps", 1)):
            if getattr(p, key) < low:
                raise ParamError(key, f"must be >= {low}, got {getattr(p, key)}")
        if p.T < 2 * p.d:
            raise ParamError("T", f"must be >= 2d = {2 * p.d} for a maximum-likelihood fit "
                                  f"that exists with high probability, got {p.T}")
        if p.signal < 0:
            raise ParamError("signal", f"must be >= 0, got {p.signal}")
        if p.ridge < 0:
            raise ParamError("ridge", f"must be >= 0, got {p.ridge}")

    def real_data(self, seed: int, chunks: int, cache_dir: Path | None = None) -> LogisticReal:
        p = self.config
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((p.trials, p.T, p.d)) / np.sqrt(p.d)
        direction = rng.standard_normal((p.trials, p.d))
        theta_star = p.signal * np.sqrt(p.d) * direction / np.linalg.norm(direction, axis=1,
                                                                            keepdims=True)
        prob = _sigmoid(np.einsum("tkd,td->kt", X, theta_star))  # (T, trials)
        train_chunks = []
        for k in range(1, chunks + 1):
            # Each chunk's labels have their own seed, so chunk 1 is the same however many
            # chunks a strategy needs: every strategy starts from identical real data.
            draw = np.random.default_rng(derive_seed(seed, "real-chunk", k))
            train_chunks.append(labels_table(np.arange(p.T), _bernoulli(draw, prob)))
        real = LogisticReal(X=X, theta_star=theta_star, train_chunks=train_chunks)
        real.first_error = _error(self.fit(real, train_chunks[0], seed), theta_star).mean()
        return real

    def fit(self, real: LogisticReal, mix: pa.Table, seed: int, context=None) -> np.ndarray:
        """Newton's method on the (ridge-regularised) log-likelihood of the mix, batched:
        a row with feature k and label y adds y·x_k to the score's data term and
        σ(x_kᵀθ)·x_k to its model term, so per-row counts c_k and label sums s_k suffice."""
        p = self.config
        feature, y = labels_from_table(mix, p.trials)
        counts = np.bincount(feature, minlength=p.T).astype(float)  # (T,)
        weight = row_weights(mix)
        if weight is not None:  # a weighted mix: weighted counts and label sums
            sums = sum_by_feature(feature, y * weight[:, None], counts).T
            counts = np.bincount(feature, weights=weight, minlength=p.T)
        else:
            sums = sum_by_feature(feature, y, counts).T  # (trials, T)
        X, Xt = real.X, real.X.transpose(0, 2, 1)
        theta = np.zeros((p.trials, p.d))
        ridge = p.ridge * counts.sum() * np.eye(p.d)
        for _ in range(p.newton_steps):
            prob = _sigmoid(np.einsum("tkd,td->tk", X, theta))  # (trials, T)
            grad = np.einsum("tdk,tk->td", Xt, sums - counts * prob) - theta @ ridge
            weight = counts * prob * (1 - prob)  # (trials, T)
            hessian = (Xt * weight[:, None, :]) @ X + ridge
            step = np.linalg.solve(hessian, grad[:, :, None])[..., 0]
            theta = theta + step
            if np.max(np.abs(step)) < 1e-10:
                break
        return theta

    def evaluate(self, real: LogisticReal, theta: np.ndarray) -> dict[str, float]:
        err = _error(theta, real.theta_star)
        return {"variance_ratio": float(err.mean() / real.first_error),
                "param_error": float(err.mean()),
                "param_error_stderr": float(err.std(ddof=1) / np.sqrt(len(err))) if len(err) > 1 else 0.0}

    def theory(self, strategy: str, generation: int) -> float | None:
        return error_growth(strategy, generation)

    def sample(self, real: LogisticReal, theta: np.ndarray, n: int, seed: int) -> pa.Table:
        p = self.config
        feature = np.arange(n) % p.T
        prob = _sigmoid(np.einsum("tkd,td->kt", real.X, theta))[feature]  # (n, trials)
        return labels_table(feature, _bernoulli(np.random.default_rng(seed), prob))

    def save_model(self, theta: np.ndarray, directory: Path) -> None:
        np.save(directory / "theta_hat.npy", theta)

    def load_model(self, directory) -> np.ndarray:
        return np.load(local_copy(directory) / "theta_hat.npy")

    def cost(self):
        from engine.plan import Cost

        return Cost(rows_per_generation=self.config.T, tokens_per_row=None, parameters=None)

    def model_name(self) -> str:
        return "logistic-mle"
