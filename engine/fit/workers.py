"""Where a fit runs: in this process, or on Ray Train workers — the same loop either way.

A `FitJob` says what to train (a model factory, where each worker's batches come from,
the loss, how rank 0 saves the result, the loop's settings); it is picklable, so Ray
Train can send it to every worker. Both ways end with a local directory holding what
`job.save` wrote plus `fit.json` (steps, workers at the end, the step a restored fit
resumed at).

On Ray Train (`fit_on_workers`): a TorchTrainer (Train V2 API) whose workers each run
`engine.fit.loop.train`; gloo on CPUs, NCCL on GPUs; elastic between min and max
workers; every `checkpoint_seconds` of training all workers write a DeepSpeed checkpoint that
Ray Train keeps in the run's storage, so a worker or node lost mid-fit costs the steps
since the last checkpoint, and a chain whose driver died goes on from it when it runs
again. The trained model comes back as the fit's last checkpoint, reported by rank 0,
so rank 0 may run on any node.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from engine.fit.loop import Curve, LoopConfig, Loss, Trained, full_weights, train

if TYPE_CHECKING:
    from engine.files import Location

FIT_RECORD = "fit.json"  # steps, workers at the end, the step a restored fit resumed at
CHECK_STEPS = 5  # the fewest steps between the workers' agreements on a checkpoint


@dataclass(frozen=True)
class FitJob:
    """What to train. Every member must pickle: Ray Train ships the job to its workers."""

    build: Callable[[], Any]  # a fresh model (the loop seeds torch first)
    batches: Callable[[int, int], Iterable]  # (rank, world size) -> this worker's batches
    loss: Loss
    save: Callable[[Any, Curve, Path], None]  # (module, curve, directory), on rank 0
    loop: LoopConfig


@dataclass(frozen=True)
class Workers:
    """A fit's Ray Train workers, from the family's parameters."""

    max_workers: int = 1
    min_workers: int | None = None  # elastic: the fewest a fit goes on with; None: max
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    extra_resources: dict = field(default_factory=dict)  # more Ray resources per worker
    max_failures: int = 3  # worker-group restarts a fit may take (-1: unlimited)
    # Training time between checkpoints (0: none). Time, not steps: a checkpoint of a
    # 126M-parameter model with its optimizer is ~1.8 GB, which every 200 small steps
    # would cost more than it saves; every few minutes bounds the work a failure loses.
    checkpoint_seconds: float = 0.0


@dataclass(frozen=True)
class FitContext:
    """What the chain gives a family's fit besides the data: `workdir`, scratch space of
    this chain and generation in the run's storage (it outlives a killed run, so a fit
    resumes from its checkpoints there), and the RunConfig callbacks of its Ray Train
    fits (the chain's Tune trial's TuneReportCallback, see engine/sweep.py), and where
    the fit writes its progress for the chain to show (engine/progress.py)."""

    workdir: "Location"
    callbacks: tuple = ()
    progress: "Location | None" = None  # where the fit's rank 0 writes how far it got
    previous_model: "Location | None" = None  # the previous generation's (a warm start's)
    # (sum of a count column, rows) of the mix, from the store's manifest
    # (CorpusStore.mix_size): a step count that does not read the mix first
    mix_size: "Callable[[str], tuple[int, int]] | None" = None
    weighted: bool = False  # the mix's rows carry loss weights (corpus.WEIGHT)


def _write_record(out: Path, trained: Trained, steps: int, world_size: int,
                  resumed_at: int | None) -> None:
    """How the fit went, beside the model (Ray Train's result keeps no metrics of a
    worker's own): the chain logs a restore from it, benchmarks read its timing."""
    (out / FIT_RECORD).write_text(json.dumps({
        "steps": steps, "world_size": world_size, "resumed_at_step": resumed_at,
        "loop_steps": steps - trained.first_step, "loop_seconds": trained.seconds}))


def read_record(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / FIT_RECORD).read_text())


def fit_here(job: FitJob, out: Path, progress: "Location | None" = None) -> dict[str, Any]:
    """The loop in this process; what job.save writes lands in the local directory
    `out`; how far it got, in `progress` (engine/progress.py). Returns the fit's record."""
    from engine.progress import StepProgress

    written = StepProgress(progress.uri if progress else None, job.loop.steps)
    trained = train(job.build, job.batches(0, 1), job.loss, job.loop,
                    on_step=lambda step, curve, save: written(step))
    _save(job, trained, out)
    _write_record(out, trained, job.loop.steps, 1, None)
    return read_record(out)


def _save(job: FitJob, trained: Trained, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with full_weights(trained) as module:
        job.save(module, trained.curve, out)


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the same fresh model (same seed) on every worker, its own
    batches; checkpoints every `checkpoint_seconds`; rank 0 reports the model."""
    import ray.train
    import torch
    import torch.distributed as dist

    from engine.fit.device import current_device

    from engine.progress import TUNE_REPORT_SECONDS, StepProgress

    job: FitJob = config["job"]
    every = config["checkpoint_seconds"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    steps = job.loop.steps
    # Rank 0 alone writes how far the fit got for the chain's log (a file: no
    # collective); every rank measures it, for the reports to Tune.
    progress = StepProgress(config["progress"] if rank == 0 else None, steps)

    last_checkpoint = last_report = time.monotonic()
    # at the loop's curve points, where it reads the loss from the device anyway: the
    # agreement below waits for the device too
    check_every = max(CHECK_STEPS, job.loop.log_every)

    def checkpoint(step: int, curve: Curve, save: Callable[[str], None]) -> None:
        """Every `every` seconds, a checkpoint; every TUNE_REPORT_SECONDS, the fit's
        progress (step, rate, ETA, latest train loss) to the chain's Tune trial. Only
        then: a report is collective, and Ray Train takes one report per worker every
        2 s, so reporting every few steps holds training back. Whether either is due is
        agreed every `check_every` steps (the slowest worker's clock decides): workers
        whose clocks disagreed would wait for each other forever."""
        nonlocal last_checkpoint, last_report
        progress(step)
        if step % check_every or step >= steps:
            return
        now = time.monotonic()
        due = torch.tensor([float(bool(every) and now - last_checkpoint >= every),
                            float(now - last_report >= TUNE_REPORT_SECONDS)],
                           device=current_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(due, op=dist.ReduceOp.MAX)
        checkpoint_due, report_due = (bool(v) for v in due.tolist())
        if not (checkpoint_due or report_due):
            return
        last_report = now
        metrics = {**_metrics(step, curve), **progress.as_metrics(step)}
        if not checkpoint_due:
            ray.train.report(metrics)
            return
        last_checkpoint = now
        with tempfile.TemporaryDirectory() as d:
            save(d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    restored = ray.train.get_checkpoint()
    if restored is None:
        trained = train(job.build, job.batches(rank, world), job.loss, job.loop,
                        on_step=checkpoint)
    else:
        with restored.as_directory() as d:
            if (Path(d) / FIT_RECORD).exists():
                # The fit had finished and reported its model when its driver died: hand
                # the same model back rather than train again.
                _report_model({"step": steps},
                              lambda out: shutil.copytree(d, out, dirs_exist_ok=True))
                return
            trained = train(job.build, job.batches(rank, world), job.loss, job.loop,
                            resume_from=d, on_step=checkpoint)
    resumed = trained.first_step if restored is not None else None

    with full_weights(trained) as module:  # collective under ZeRO-3: every rank enters
        def save(out: Path) -> None:
            job.save(module, trained.curve, out)
            _write_record(out, trained, steps, world, resumed)

        _report_model(_metrics(steps, trained.curve), save)


def _metrics(step: int, curve: Curve) -> dict[str, Any]:
    return {"step": step, **({"train_loss": curve[-1][1]} if curve else {})}


def _report_model(metrics: dict[str, Any], save: Callable[[Path], None]) -> None:
    """A worker's last report: rank 0 saves the model into a directory and reports it as
    the fit's checkpoint, which Ray Train puts in the run's storage whichever node rank 0
    ran on; every other worker reports the metrics alone, since a report is collective."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save(Path(d))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def fit_on_workers(job: FitJob, workers: Workers, storage: "Location", out: Path,
                   callbacks: Iterable = (), datasets: dict | None = None,
                   progress: "Location | None" = None) -> dict[str, Any]:
    """`job` on Ray Train workers; the model lands in the local directory `out`.
    `storage` (a shared path or an object-store URI) keeps Ray Train's checkpoints: the
    same storage on a rerun lets a fit whose driver was killed go on from the latest.
    `datasets`: Ray Datasets the workers read with `ray.train.get_dataset_shard`.
    `progress`: where rank 0 writes how far it got. Returns the fit's record."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": workers.cpus_per_worker, **workers.extra_resources}
    if workers.gpus_per_worker:
        resources["GPU"] = workers.gpus_per_worker
    fewest = workers.min_workers or workers.max_workers
    count = (workers.max_workers if fewest == workers.max_workers
             else (fewest, workers.max_workers))
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job, "checkpoint_seconds": workers.checkpoint_seconds,
                           "progress": progress.uri if progress else None},
        torch_config=TorchConfig(backend="nccl" if workers.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(num_workers=count, use_gpu=bool(workers.gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RunConfig(name="fit", **storage.storage(),
                             failure_config=FailureConfig(max_failures=workers.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=list(callbacks)),
        datasets=datasets or {},
    )
    result = trainer.fit()
    result.checkpoint.to_directory(str(out))
    return read_record(out)
