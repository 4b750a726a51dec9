"""Ray Tune over a study's grid: one Tune trial per chain.

Tune places the chains on the cluster (or the local machine) and each chain reports
after every generation with `ray.tune.report`. Resuming needs nothing from Tune: every
chain resumes from its own directory (see engine/chain.py), so running the same study
again finishes exactly the work that is missing.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.chain import ChainError, completed_generations, run_chain
from engine.spec import Study, Trial

log = logging.getLogger("engine.sweep")

# Tune's newer console output prints its configuration table whatever the verbosity;
# the classic reporter honours verbose=0, and the engine prints its own progress.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

def _chain_trainable(config: dict[str, Any]) -> None:
    """What each Tune trial runs: one chain."""
    from ray import tune

    trial = Trial.from_dict(config["trial"])
    run_chain(trial, config["generations"], config["out"],
              report=lambda g, scores: tune.report({"generation": g, **scores}))


def _progress_callback(study: Study, done: int, total: int, say: Callable[[str], None]):
    from ray import tune

    class Progress(tune.Callback):
        """Prints one line per finished generation; Tune's own tables are switched off."""

        def __init__(self):
            self.done = done
            self.start = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.done += 1
            trial_id = trial.config["trial"]["trial_id"]
            headline = next((f"{k}={result[k]:.4g}" for k in result
                             if k not in ("generation",) and isinstance(result[k], float)), "")
            say(f"[{study.name}] {self.done}/{total} generations "
                f"({time.time() - self.start:.0f}s)  {trial_id}  "
                f"gen {result['generation']}  {headline}")

    return Progress()


def _probe(address: str) -> None:
    """Fail in seconds, not after Ray's 30 s GCS timeout, when a HOST:PORT is closed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "local", ray:// client addresses: ray.init decides
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {address} ({e.strerror or e}); start the "
                              "cluster (ray start --head) or fix --address") from None


@contextmanager
def ray_connection(address: str | None) -> Iterator[None]:
    """Join the Ray at `address`, or start a local one; leave Ray as we found it."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        _probe(address)
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def run_sweep(study: Study,
              say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> None:
    """Run every chain of the study not yet finished. Needs a Ray connection."""
    from ray import tune

    out = Path(study.out).resolve()
    trials = study.trials()
    total = len(trials) * study.generations
    done = sum(min(completed_generations(out, t), study.generations) for t in trials)
    if done == total:
        say(f"[{study.name}] all {len(trials)} chains already complete in {out}")
        return
    say(f"[{study.name}] {len(trials)} chains × {study.generations} generations; "
        f"{done}/{total} generations already on disk")

    r = study.resources
    tuner = tune.Tuner(
        tune.with_resources(_chain_trainable, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial}),
        param_space={
            "trial": tune.grid_search([t.to_dict() for t in trials]),
            "generations": study.generations,
            "out": str(out),
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=r.max_concurrent_trials,
            reuse_actors=True,
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"],
        ),
        run_config=tune.RunConfig(
            name="sweep",
            storage_path=str(out / "tune"),
            verbose=0,
            callbacks=[_progress_callback(study, done, total, say)],
        ),
    )
    grid = tuner.fit()
    failed = [(result.config["trial"]["trial_id"], result.error)
              for result in grid if result.error is not None]
    if failed:
        trial_id, error = failed[0]
        raise ChainError(f"{len(failed)} of {len(trials)} chains failed; first: "
                         f"{trial_id}: {error}")
