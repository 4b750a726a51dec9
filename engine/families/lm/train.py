"""Fitting a language model: packed token blocks, DeepSpeed, warmup + cosine.

`train_loop` is the inner loop — a plain function of (model, batches) that tests and
GPU benchmarks call directly. `fit_ray` wraps it in a Ray Train `TorchTrainer` whose
workers stream packed blocks from the mix with `get_dataset_shard(...).iter_torch_batches`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa


BLOCK = "input_ids"


@dataclass(frozen=True)
class TrainConfig:
    """What the inner loop needs; built from the study's family parameters."""

    model: str
    vocab_size: int
    context: int
    bos: int
    eos: int
    pad: int
    batch_size: int
    lr: float
    warmup: float
    weight_decay: float
    precision: str  # "fp32" or "bf16"
    zero_stage: int
    seed: int
    log_every: int
    threads: int = 0  # torch threads per worker; 0 = torch's default

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def pack_blocks(ids: Iterable[Iterable[int]], context: int, eos: int) -> np.ndarray:
    """Concatenate stories as [EOT] s1 [EOT] s2 ... and cut the stream into blocks of
    `context` tokens (the last partial block is dropped). (blocks, context) int64."""
    pieces = []
    for story in ids:
        pieces.append(np.asarray([eos], dtype=np.int64))
        pieces.append(np.asarray(story, dtype=np.int64))
    if not pieces:
        return np.zeros((0, context), dtype=np.int64)
    stream = np.concatenate(pieces + [np.asarray([eos], dtype=np.int64)])
    n = len(stream) // context
    return stream[: n * context].reshape(n, context)


def pack_batch(batch: pa.Table, context: int, eos: int) -> pa.Table:
    """Ray Data batch function: a batch of stories -> a batch of packed blocks."""
    blocks = pack_blocks(batch.column("ids").to_pylist(), context, eos)
    flat = pa.array(blocks.ravel())
    return pa.table({BLOCK: pa.FixedSizeListArray.from_arrays(flat, context)})


def total_steps(tokens: int, stories: int, cfg: TrainConfig, epochs: float, workers: int,
                token_budget: int | None) -> int:
    blocks = (tokens + stories + 1) // cfg.context
    budget_blocks = blocks * epochs if token_budget is None else token_budget / cfg.context
    return max(1, math.ceil(budget_blocks / (cfg.batch_size * workers)))


def deepspeed_config(cfg: TrainConfig, steps: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        # torch_adam: DeepSpeed would otherwise JIT-compile its CPU Adam (≈50 s on 2 cores).
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.95],
                                                  "eps": 1e-8, "weight_decay": cfg.weight_decay,
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": steps,
                                 "warmup_num_steps": max(1, int(cfg.warmup * steps)),
                                 "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1,
                                 "warmup_type": "linear"}},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def ensure_process_group() -> None:
    """DeepSpeed needs torch.distributed. Ray Train sets it up on its workers; a plain
    process (tests, benchmarks, trainer: local) gets a one-member gloo group."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import deepspeed

    # A file rendezvous, not MASTER_ADDR/PORT: a port picked here could be taken by the
    # time the store binds it, and env variables leak into child processes (a stale
    # MASTER_PORT inherited from a parent that still listens on it: EADDRINUSE).
    store = tempfile.NamedTemporaryFile(prefix="collapse-pg-", delete=False)
    store.close()
    os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"] = "0", "0", "1"
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                               init_method=f"file://{store.name}", rank=0, world_size=1)


def train_loop(model, batches: Iterator, cfg: TrainConfig, steps: int, device: str = "cpu",
               resume_from: str | None = None,
               on_step: Callable[[Any, int, list], None] | None = None,
               ) -> tuple[Any, list[tuple[int, float]]]:
    """The inner loop: DeepSpeed engine over `steps` batches of (B, context) token ids.
    Returns the trained torch module and the train-loss curve [(step, loss)].

    `resume_from`: a directory `save_state` wrote; the loop goes on from its step with
    its weights, optimizer, schedule and curve. `on_step(engine, step, curve)` runs
    after every step (Ray Train checkpoints from there)."""
    import deepspeed
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ensure_process_group()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, steps))
    engine.train()
    curve: list[tuple[int, float]] = []
    step = 0
    if resume_from is not None:
        _, state = engine.load_checkpoint(resume_from, tag=CHECKPOINT_TAG)
        step, curve = int(state["step"]), [tuple(x) for x in state["curve"]]
    window: list[float] = []
    for x in batches:
        if step >= steps:
            break
        x = x.to(engine.device if device != "cpu" else "cpu")
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        step += 1
        window.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == steps:
            curve.append((step, float(np.mean(window))))
            window = []
        if on_step is not None:
            on_step(engine, step, curve)
    if window:
        curve.append((step, float(np.mean(window))))
    return engine.module, curve


CHECKPOINT_TAG = "state"
FIT_RECORD = "fit.json"  # steps, workers at the end, the step a restored fit resumed at


def save_state(engine, directory: str, step: int, curve: list) -> None:
    """DeepSpeed's own checkpoint (weights, optimizer, schedule; each rank writes its
    part) plus where the loop stood. Every rank must call it."""
    engine.save_checkpoint(directory, tag=CHECKPOINT_TAG,
                           client_state={"step": step, "curve": [list(c) for c in curve]})


def blocks_from_table(table: pa.Table, cfg: TrainConfig, epochs: float, steps: int,
                      seed: int) -> Iterator:
    """In-process batches: shuffled stories, packed, shuffled blocks, repeated per epoch."""
    import torch

    ids = table.column("ids").to_pylist()
    rng = np.random.default_rng(seed)
    served = 0
    while served < steps:
        order = rng.permutation(len(ids))
        blocks = pack_blocks([ids[i] for i in order], cfg.context, cfg.eos)
        if len(blocks) < cfg.batch_size:
            raise ValueError(f"the mix packs into {len(blocks)} blocks of {cfg.context} tokens, "
                             f"fewer than one batch of {cfg.batch_size}")
        blocks = blocks[rng.permutation(len(blocks))]
        for start in range(0, len(blocks) - cfg.batch_size + 1, cfg.batch_size):
            yield torch.from_numpy(blocks[start:start + cfg.batch_size])
            served += 1
            if served >= steps:
                return


def save_trained(module, curve: list[tuple[int, float]], out: Path) -> None:
    """Weights, config and train curve of an HF checkpoint (the caller adds the
    tokenizer, which it has: a Ray Train worker may run on a node without it)."""
    out.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(out, safe_serialization=True)
    (out / "train_curve.json").write_text(json.dumps(curve))


def fit_local(table: pa.Table, cfg: TrainConfig, epochs: float, token_budget: int | None,
              out: Path) -> None:
    """The inner loop in this process, on an in-memory mix."""
    from engine.families.lm import zoo

    tokens = int(pa.compute.sum(table.column("n_tokens")).as_py())
    steps = total_steps(tokens, table.num_rows, cfg, epochs, 1, token_budget)
    model = zoo.build(zoo.ZOO[cfg.model], cfg.vocab_size, cfg.context, cfg.bos, cfg.eos,
                      cfg.pad, cfg.seed)
    module, curve = train_loop(model, blocks_from_table(table, cfg, epochs, steps, cfg.seed),
                               cfg, steps)
    save_trained(module, curve, out)


def _ray_worker(config: dict[str, Any]) -> None:
    """Each Ray Train worker: the same fresh model (same seed), its shard of the blocks.

    Every `checkpoint_every` steps all workers write a DeepSpeed checkpoint that Ray Train
    keeps in the run's storage (shared storage on a cluster). When a worker or its node
    dies, Ray Train starts the worker group again with the workers it can place (between
    min and max) and every worker goes on from the latest checkpoint.

    The trained model goes back to the caller the same way, as the fit's last
    checkpoint (engine.raytrain.report_model)."""
    import ray.train
    import torch

    from engine.raytrain import report_model

    from engine.families.lm import zoo

    cfg = TrainConfig(**config["cfg"])
    steps, every = config["steps"], config["checkpoint_every"]
    model = zoo.build(zoo.ZOO[cfg.model], cfg.vocab_size, cfg.context, cfg.bos, cfg.eos,
                      cfg.pad, cfg.seed)
    shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()

    def batches():
        epoch = 0
        while True:
            for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True,
                                                  dtypes=torch.int64,
                                                  local_shuffle_buffer_size=8 * cfg.batch_size,
                                                  local_shuffle_seed=cfg.seed + epoch + rank):
                yield batch[BLOCK]
            epoch += 1

    first_step: list[int] = []

    def checkpoint(engine, step, curve):
        """After every step; every `checkpoint_every` steps, a checkpoint with the latest
        train loss (which a Tune trial shows, see engine/raytrain.py). Only then: a
        report is collective, and Ray Train takes one report per worker every 2 s, so
        reporting every few steps would hold training back."""
        if not first_step:
            first_step.append(step)
        if every and step % every == 0 and step < steps:
            with tempfile.TemporaryDirectory() as d:
                save_state(engine, d, step, curve)
                ray.train.report(_metrics(step, curve),
                                 checkpoint=ray.train.Checkpoint.from_directory(d))

    restored = ray.train.get_checkpoint()
    if restored is None:
        module, curve = train_loop(model, batches(), cfg, steps, on_step=checkpoint)
    else:
        with restored.as_directory() as d:
            if (Path(d) / FIT_RECORD).exists():
                # The fit had finished and reported its model when its driver died: hand
                # the same model back rather than train again.
                report_model({"step": steps},
                             lambda out: shutil.copytree(d, out, dirs_exist_ok=True))
                return
            module, curve = train_loop(model, batches(), cfg, steps, resume_from=d,
                                       on_step=checkpoint)

    def save(out: Path) -> None:
        save_trained(module, curve, out)
        # How this fit went, beside the model (Ray Train's result keeps no metrics of
        # a worker's own): the chain logs a restore from it.
        (out / FIT_RECORD).write_text(json.dumps({
            "steps": steps, "world_size": ray.train.get_context().get_world_size(),
            "resumed_at_step": first_step[0] - 1 if restored and first_step else None}))

    report_model(_metrics(steps, curve), save)


def _metrics(step: int, curve: list) -> dict[str, Any]:
    return {"step": step, **({"train_loss": curve[-1][1]} if curve else {})}


def fit_ray(dataset, cfg: TrainConfig, epochs: float, token_budget: int | None,
            out: Path, scaling: "Scaling", storage) -> dict[str, Any]:
    """Ray Train TorchTrainer + DeepSpeed over a Ray Dataset of stories; the model
    lands in the local directory `out`. `storage` (an engine.files.Location: a shared
    path or an object-store URI) keeps Ray Train's checkpoints. Returns the fit's record
    (steps, the workers it ended with, the step it resumed at if a failure made it
    restore a checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray.data.aggregate import Count, Sum

    from engine.raytrain import run_callbacks

    stats = dataset.aggregate(Sum("n_tokens"), Count())  # one pass for both
    # Steps are fixed from the most workers; a group restarted with fewer after a
    # failure takes the remaining steps with a smaller global batch.
    steps = total_steps(int(stats["sum(n_tokens)"]), int(stats["count()"]), cfg, epochs,
                        scaling.max_workers, token_budget)
    from engine.raydata import TASK_CPUS

    blocks = (dataset.random_shuffle(seed=cfg.seed, num_cpus=TASK_CPUS)
              .map_batches(pack_batch, fn_kwargs={"context": cfg.context, "eos": cfg.eos},
                           batch_format="pyarrow", batch_size=1024, num_cpus=TASK_CPUS))
    resources = {"CPU": scaling.cpus_per_worker, **scaling.extra_resources}
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    workers = (scaling.max_workers if scaling.min_workers == scaling.max_workers
               else (scaling.min_workers, scaling.max_workers))
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg.to_dict(), "steps": steps,
                           "checkpoint_every": scaling.checkpoint_every},
        torch_config=TorchConfig(backend="nccl" if scaling.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(scaling.gpus_per_worker),
                                     resources_per_worker=resources),
        # The same name and storage on a rerun: Ray Train finds its own checkpoints there
        # and a fit whose driver was killed goes on from the latest one.
        run_config=RunConfig(name="fit", **storage.storage(),
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=run_callbacks()),
        datasets={"train": blocks},
    )
    result = trainer.fit()
    result.checkpoint.to_directory(str(out))
    return json.loads((out / FIT_RECORD).read_text())


@dataclass(frozen=True)
class Scaling:
    """Where and how a fit's Ray Train workers run, from the study's family parameters."""

    min_workers: int
    max_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    extra_resources: dict
    max_failures: int  # worker-group restarts a fit may take (-1: unlimited)
    checkpoint_every: int  # steps between checkpoints (0: none)
