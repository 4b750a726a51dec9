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
from typing import Any, Callable, Iterator

from engine.chain import ChainError, completed_generations, read_metrics, run_chain
from engine.spec import Study, Trial


# Tune's newer console output prints its configuration table whatever the verbosity;
# the classic reporter honours verbose=0, and the engine prints its own progress.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

def _run_chain_task(trial: dict[str, Any], out: str, fit_callbacks: list) -> None:
    from engine import raytrain

    trial = Trial.from_dict(trial)
    with raytrain.fit_callbacks(fit_callbacks):
        run_chain(trial, trial.generations, out)


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

    trial = Trial.from_dict(config["trial"])
    generations, out = trial.generations, Location.of(config["out"])
    # Each look is a few requests per generation; an object store is asked less often.
    every = 0.5 if out.is_local else 5.0
    task = ray.remote(_run_chain_task).options(
        num_cpus=0, max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    ).remote(config["trial"], config["out"], _fit_callbacks(trial))
    reported = completed_generations(out, trial)
    while True:
        finished, _ = ray.wait([task], timeout=every)
        # Only the generations not reported yet: the rest was read before.
        for record in read_metrics(out, trial, generations, first=reported + 1):
            tune.report({"generation": record["generation"], **record["metrics"]})
            reported = record["generation"]
        if finished:
            ray.get(task)  # raises the chain's error, if any
            return


def _fit_callbacks(trial: Trial) -> list:
    """The TuneReportCallback for the chain's fits, made only for families that start
    Ray processes of their own (trainer workers, sampler actors): each one is a queue
    actor, a worker process whose start-up would otherwise be paid by every chain of a
    study of in-memory fits (it made the 90-chain linear study 8x slower)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from engine.families import get_family

    family = get_family(trial.family)
    params = family.Params(**trial.params)
    starts_ray_processes = family.chain_cpus(params) or family.chain_gpus(params)
    return [TuneReportCallback()] if starts_ray_processes else []


def _progress_callback(study: Study, done: int, total: int, say: Callable[[str], None]):
    from ray import tune

    from engine.families import get_family

    family = get_family(study.family)

    class Progress(tune.Callback):
        """Prints one line per finished generation; Tune's own tables are switched off."""

        def __init__(self):
            self.done = done
            self.start = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "generation" not in result:
                return  # a training step one of the chain's fits reported
            self.done += 1
            trial_id = trial.config["trial"]["trial_id"]
            shown = [m for m in family.metrics[:2] if isinstance(result.get(m), float)]
            headline = "  ".join(f"{m}={result[m]:.4g}" for m in shown)
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


def node_shapes() -> list[dict[str, float]]:
    """The resources of every node the cluster has or may start: live nodes, plus each
    node type the autoscaler may add (cluster.yaml's `available_node_types`)."""
    import ray
    from ray._private.state import state

    shapes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 — no autoscaler state (a local Ray): live nodes only
        config = None
    for group in getattr(config, "node_group_configs", []) or []:
        if group.max_count != 0:
            shapes.append({k: float(v) for k, v in group.resources.items()})
    return shapes


def _autoscaler_max() -> dict[str, float]:
    """The most of each resource the autoscaler may bring up ({} without one)."""
    from ray._private.state import state

    try:
        return dict(state.get_max_resources_from_cluster_config() or {})
    except Exception:  # noqa: BLE001 — a local Ray has no autoscaler config
        return {}


def _fits(need: dict[str, float], shape: dict[str, float]) -> bool:
    return all(amount <= shape.get(name, 0.0) + 1e-9 for name, amount in need.items() if amount)


def _show(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items()
             if v and (k in ("CPU", "GPU") or not k.startswith(("node:", "memory",
                                                                "object_store_memory")))}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items())) or "nothing"


def check_fits_cluster(study: Study) -> None:
    """Refuse, before any work starts, a study one of whose processes no node can hold
    (e.g. 8 GPUs per trainer worker on a cluster without GPUs): Ray would otherwise wait
    for such a node forever, silently."""
    from engine.families import get_family
    from engine.spec import SpecError

    family = get_family(study.family)
    shapes = node_shapes()
    nodes = "; ".join(sorted({_show(s) for s in shapes})) or "no nodes"
    r = study.resources
    driver = {"CPU": r.cpus_per_trial, "GPU": r.gpus_per_trial}
    if not any(_fits(driver, s) for s in shapes):
        key = "gpus_per_trial" if r.gpus_per_trial and not any(
            _fits({"GPU": r.gpus_per_trial}, s) for s in shapes) else "cpus_per_trial"
        raise SpecError(f"{study.source}: resources.{key}: a chain's driver asks for "
                        f"{_show(driver)}, but no node of this cluster has that (nodes: "
                        f"{nodes}); lower it or add such a node type to cluster.yaml")
    for trial in study.trials():
        for bundle in family.placement(family.Params(**trial.params)):
            if any(_fits(bundle.resources, s) for s in shapes):
                continue
            short = next((k for k, v in bundle.resources.items()
                          if v and not any(_fits({k: v}, s) for s in shapes)), "CPU")
            field = bundle.fields.get(short, "")
            raise SpecError(f"{study.source}: family.{field}: a {bundle.what} asks for "
                            f"{_show(bundle.resources)}, but no node of this cluster has that "
                            f"(nodes: {nodes}); lower it or add such a node type to "
                            "cluster.yaml")


def _default_concurrency(study: Study) -> int | None:
    """How many chains may run at once when the study does not say.

    A chain holds its driver's reservation (cpus_per_trial, gpus_per_trial) plus what
    its family holds while it runs (trainer workers, sampler actors); on a cluster the
    GPUs usually decide. When chains stream their mix from Parquet, Ray Data's file
    listing asks for one whole CPU, so one CPU is kept free for it: without that, every
    chain waits on a read that can never be scheduled."""
    import ray

    from engine.families import get_family

    family = get_family(study.family)
    params = [family.Params(**t.params) for t in study.trials()]
    r = study.resources
    cpus_held = max(family.chain_cpus(p) for p in params)
    gpus_held = max(family.chain_gpus(p) for p in params) + r.gpus_per_trial
    if not cpus_held and not gpus_held:
        return None  # in-memory families: Tune's own accounting of cpus_per_trial suffices
    # What the cluster has, or may grow to under its autoscaler.
    now, most = ray.cluster_resources(), _autoscaler_max()
    total = {k: max(now.get(k, 0.0), most.get(k, 0.0)) for k in ("CPU", "GPU")}
    streams = any(family.data_view(p) == "dataset" for p in params)
    limits = [max(1, int((total["CPU"] - (1 if streams else 0)) // (r.cpus_per_trial + cpus_held)))]
    if gpus_held:
        limits.append(max(1, int(total["GPU"] // gpus_held)))
    return min(limits)


def run_sweep(study: Study,
              say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> None:
    """Run every chain of the study not yet finished. Needs a Ray connection."""
    from ray import tune

    from engine.files import Location

    out = Location.of(study.out)
    if out.is_local:
        out = Location(str(out.local_path.resolve()))  # chains may run in other directories
    trials = study.trials()
    total = sum(t.generations for t in trials)
    done = sum(min(completed_generations(out, t), t.generations) for t in trials)
    if done == total:
        say(f"[{study.name}] all {len(trials)} chains already complete in {out}")
        return
    say(f"[{study.name}] {len(trials)} chains, {total} generations; "
        f"{done} already on disk")

    r = study.resources
    concurrent = r.max_concurrent_trials or _default_concurrency(study)
    tuner = tune.Tuner(
        tune.with_resources(_chain_trainable, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial}),
        param_space={
            "trial": tune.grid_search([t.to_dict() for t in trials]),
            "out": out.uri,
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent,
            reuse_actors=True,
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"],
        ),
        run_config=tune.RunConfig(
            name="sweep",
            **(out / "tune").storage(),
            verbose=0,
            # A chain whose driver died (its node lost) starts again and resumes from
            # its own directory: finished generations are kept, a fit goes on from its
            # last training checkpoint.
            failure_config=tune.FailureConfig(max_failures=r.max_failures),
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
