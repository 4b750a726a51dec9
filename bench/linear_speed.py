"""Linear family: the engine's batched chain against a straightforward per-trial loop.

Both run the same experiment (replace strategy: each generation refits OLS to labels
made by the previous fit) side by side in one process:

  engine chain   — engine.chain.run_chain: all trials as batched linear algebra, with
                   the real corpus store (Parquet shards, checksums, manifest, model
                   checkpoints, fsync) on every generation
  engine family  — the same family functions (fit, evaluate, sample) called in a loop
                   in memory: the batched compute alone, without the store
  bare           — for each trial, for each generation: np.linalg.lstsq, then labels

    python bench/linear_speed.py [--trials 10000] [--generations 100] [--d 10] [--T 100]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from engine.chain import run_chain
from engine.spec import Trial


def bare_loop(trials: int, generations: int, d: int, T: int, sigma2: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    errors = np.zeros((generations, trials))
    for t in range(trials):
        X = rng.standard_normal((T, d))
        w_star = rng.standard_normal(d)
        y = X @ w_star + np.sqrt(sigma2) * rng.standard_normal(T)
        for g in range(generations):
            w = np.linalg.lstsq(X, y, rcond=None)[0]
            errors[g, t] = np.sum((w - w_star) ** 2)
            y = X @ w + np.sqrt(sigma2) * rng.standard_normal(T)
    return errors.mean(axis=1)


def engine_chain(trials: int, generations: int, d: int, T: int, sigma2: float, out: str) -> None:
    params = {"d": d, "T": T, "sigma2": sigma2, "ridge": 0.0, "trials": trials}
    trial = Trial(study="bench", trial_id="replace", family="linear", strategy="replace",
                  seed=0, params=params, axes={}, generations=generations)
    run_chain(trial, generations, out)


def engine_family_only(trials: int, generations: int, d: int, T: int, sigma2: float) -> float:
    from engine.families import get_family

    family = get_family("linear").from_params({"d": d, "T": T, "sigma2": sigma2,
                                               "trials": trials})
    real = family.real_data(seed=0, chunks=1)
    mix = real.train_chunks[0]
    for g in range(1, generations + 1):
        w_hat = family.fit(real, mix, seed=g)
        error = family.evaluate(real, w_hat)["test_error"]
        mix = family.sample(real, w_hat, T, seed=g)
    return error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--generations", type=int, default=100)
    ap.add_argument("--d", type=int, default=10)
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--sigma2", type=float, default=1.0)
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        engine_chain(a.trials, a.generations, a.d, a.T, a.sigma2, out)
        engine_s = time.perf_counter() - start
    start = time.perf_counter()
    family_error = engine_family_only(a.trials, a.generations, a.d, a.T, a.sigma2)
    family_s = time.perf_counter() - start
    start = time.perf_counter()
    bare = bare_loop(a.trials, a.generations, a.d, a.T, a.sigma2)
    bare_s = time.perf_counter() - start

    theory = a.sigma2 * a.d / (a.T - a.d - 1) * a.generations
    print(f"linear family, replace, {a.trials} trials × {a.generations} generations, "
          f"d={a.d}, T={a.T}")
    print(f"  engine chain (batched, with corpus store): {engine_s:8.2f} s   {bare_s / engine_s:6.1f}× bare")
    print(f"  engine family compute (batched, no store): {family_s:8.2f} s   {bare_s / family_s:6.1f}× bare")
    print(f"  bare per-trial lstsq loop:                 {bare_s:8.2f} s")
    print(f"  final test error: engine {family_error:.4f}, bare {bare[-1]:.4f}, "
          f"closed form {theory:.4f}")


if __name__ == "__main__":
    main()
