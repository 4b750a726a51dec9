"""Ray Tune over a study's grid: one Tune trial per chain.

Tune places the chains on the cluster (or the local machine) and each chain reports
after every generation with `ray.tune.report`. Resuming needs nothing from Tune: every
chain resumes from its own directory (see engine/chain.py), so running the same study
again finishes exactly the work that is missing.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

from engine.chain import ChainError, completed_generations, one_line, read_metrics, run_chain
from engine.families import family_for, get_family
from engine.layout import RunLayout
from engine.cluster import chain_memory, default_concurrency
from engine.spec import Study, Trial


# Tune's newer console output prints its configuration table whatever the verbosity;
# the classic reporter honours verbose=0, and the engine prints its own progress.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Ctrl-C stops the study at once (the CLI exits 130 and says how to resume) instead of
# Tune's graceful stop, which returns as if the study had finished with partial results.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

FAILED = "chain_failed"  # the result key of a chain that stopped on an error a retry repeats

def _run_chain_task(trial: dict[str, Any], out: str, fit_callbacks: list) -> None:
    trial = Trial.from_dict(trial)
    run_chain(trial, trial.generations, out, fit_callbacks=tuple(fit_callbacks))


def _chain_trainable(config: dict[str, Any]) -> None:
    """What each Tune trial runs: one chain, reported to Tune generation by generation.

    Tune captures every task a trial starts into the trial's placement group, where a
    chain's Ray Data tasks (shuffles, aggregates) cannot fit. So the chain runs as a task
    outside the group (num_cpus=0: it spends the trial's reservation, which otherwise
    sits idle), and this function reports each generation as its metrics file lands.

    The chain's fits are Ray Train V2 TorchTrainers whose worker groups take placement
    groups of their own. Their reports reach this trial through TuneReportCallback
    (Ray Train V2's Tune-over-Train): the callback is made here, in the trial's Tune
    session, and handed to the chain, whose fits put it in their RunConfig; Tune then
    shows each fit's checkpoints and end beside the chain's generations."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from engine.files import Location
    from engine.progress import read_progress

    trial = Trial.from_dict(config["trial"])
    generations, out = trial.generations, Location.of(config["out"])
    # Each look is a few requests per generation; an object store is asked less often.
    every = 0.5 if out.is_local else 5.0
    task = ray.remote(_run_chain_task).options(
        # Memory: Ray places the chain only on a node with that much free.
        num_cpus=0, max_retries=0, memory=config["memory"],
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    ).remote(config["trial"], config["out"], _fit_callbacks(trial))
    reported = completed_generations(out, trial)
    progress_file, progress = RunLayout(out).chain(trial.trial_id).progress, None
    while True:
        finished, _ = ray.wait([task], timeout=every)
        # Only the generations not reported yet: the rest was read before.
        for record in read_metrics(out, trial, generations, first=reported + 1):
            # Finite values only: Tune's TensorBoard writer warns of every NaN on the
            # console (the table is built from the metrics files, not from Tune).
            tune.report({"generation": record["generation"],
                         **{k: v for k, v in record["metrics"].items()
                            if not isinstance(v, float) or math.isfinite(v)}})
            reported = record["generation"]
        # The running sampling pass's progress (engine/progress.py), each time it moves:
        # Tune's results, and so the Ray dashboard, show it. Without `generation`, the
        # study's progress lines and the trackers leave it out. Not a fit's: its workers
        # report their own through TuneReportCallback, and Tune's function session
        # deadlocks when this function reports while that callback does (seen here).
        latest = read_progress(progress_file)
        if latest is not None and latest.phase == "sampling" and latest != progress \
                and not finished:
            progress = latest
            tune.report({f"progress_{k}": v for k, v in asdict(latest).items()
                         if v is not None})
        if finished:
            try:
                ray.get(task)
            except ChainError as e:
                cause = getattr(e, "cause", e)  # Ray's wrapper of the chain's own error
                if getattr(cause, "retry", True):
                    raise  # Tune runs the chain again (resources.max_failures times)
                # Bad data or a corrupt corpus: running it again would fail again.
                tune.report({FAILED: str(cause)})
            return


def _fit_callbacks(trial: Trial) -> list:
    """The TuneReportCallback for the chain's fits, made only for families that start
    Ray processes of their own (trainer workers, sampler actors): each one is a queue
    actor, a worker process whose start-up would otherwise be paid by every chain of a
    study of in-memory fits (it made the 90-chain linear study 8x slower)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    family = family_for(trial)
    starts_ray_processes = family.chain_cpus() or family.chain_gpus()
    return [TuneReportCallback()] if starts_ray_processes else []


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _progress_callback(study: Study, out, done: int, total: int, say: Callable[[str], None]):
    from ray.tune.progress_reporter import TrialProgressCallback

    family = get_family(study.family)
    chains = study.trials()

    class Progress(TrialProgressCallback):
        """Prints one line per finished generation, and nothing of Tune's own (a Tune
        progress callback given, Tune adds none that prints `Trial ... completed`)."""

        def __init__(self):
            super().__init__()
            self.done = done
            self.start = time.time()
            self.at_start = {t.trial_id: completed_generations(out, t) for t in chains}
            self.reported: dict[str, int] = {}

        def log_result(self, trial, result, error=False) -> None:
            pass

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            # A chain that finished has every generation on disk, reported or not: a
            # generation written just before a restart is not reported again.
            chain = trial.config["trial"]
            if FAILED in (trial.last_result or {}):
                return  # it stopped on an error a retry repeats: not finished
            self.reported[chain["trial_id"]] = chain["generations"]
            before = self.done
            self.done = self._count()
            if self.done != before:
                self._say(chain["trial_id"], "all generations")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "generation" not in result:
                return  # a fit's checkpoint, or a chain's failure (raised at the end)
            # Counted per chain as the highest generation it reported (a chain restarted
            # after a failure reports some generations again, and reports follow the disk).
            # Not the disk alone: another chain's generation may land there before its
            # result reaches this callback, and the count would reach the total early.
            trial_id = trial.config["trial"]["trial_id"]
            self.reported[trial_id] = max(self.reported.get(trial_id, 0),
                                          int(result["generation"]))
            self.done = self._count()
            shown = [m for m in family.metrics[:2] if isinstance(result.get(m), float)]
            headline = "  ".join(f"{m}={result[m]:.4g}" for m in shown)
            self._say(trial_id, f"gen {result['generation']}  {headline}")

        def _count(self) -> int:
            return sum(min(max(self.reported.get(t.trial_id, 0), self.at_start[t.trial_id]),
                           t.generations) for t in chains)

        def _say(self, trial_id: str, what: str) -> None:
            elapsed = time.time() - self.start
            # A plain estimate from this run's pace: generations differ in cost (an
            # accumulating chain's later ones train on more), so it is a guide.
            left = elapsed / max(1, self.done - done) * (total - self.done)
            eta = f", ~{_duration(left)} left" if self.done < total else ""
            say(f"[{study.name}] {self.done}/{total} generations "
                f"({elapsed:.0f}s{eta})  {trial_id}  {what}")

    return Progress()


def run_sweep(study: Study,
              say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
              trackers: list = ()) -> None:
    """Run every chain of the study not yet finished, logging to `trackers` (Tune
    callbacks, engine/tracking.py). Needs a Ray connection."""
    from ray import tune

    from engine.files import Location

    out = Location.of(study.out)
    if out.is_local:
        out = Location(str(out.local_path.resolve()))  # chains may run in other directories
    trials = study.trials()
    total = sum(t.generations for t in trials)
    done = sum(min(completed_generations(out, t), t.generations) for t in trials)
    say(f"[{study.name}] {len(trials)} chains, {total} generations; "
        f"{done} already on disk")

    r = study.resources
    concurrent = r.max_concurrent_trials or default_concurrency(study)
    tuner = tune.Tuner(
        tune.with_resources(_chain_trainable, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial}),
        param_space={
            "trial": tune.grid_search([t.to_dict() for t in trials]),
            "out": out.uri,
            "memory": max(chain_memory(study, t) for t in trials),
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent,
            reuse_actors=True,
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"],
        ),
        run_config=tune.RunConfig(
            name="sweep",
            **RunLayout(out).tune.storage(),
            verbose=0,
            # A chain whose driver died (its node lost) starts again and resumes from
            # its own directory: finished generations are kept, a fit goes on from its
            # last training checkpoint.
            failure_config=tune.FailureConfig(max_failures=r.max_failures),
            callbacks=[_progress_callback(study, out, done, total, say), *trackers],
        ),
    )
    grid = tuner.fit()
    failed = []
    for result in grid:
        if (result.metrics or {}).get(FAILED):
            failed.append(result.metrics[FAILED])
        elif result.error is not None:
            # A chain whose every retry failed, or a trial that never started (its
            # config is then unknown): Tune keeps the traceback beside its results.
            where = f" (details: {result.path}/error.txt)" if result.path else ""
            failed.append(f"{one_line(result.error)}{where}")
    if failed:
        more = f" ({len(failed)} of {len(trials)} chains failed)" if len(failed) > 1 else ""
        raise ChainError(failed[0] + more)
