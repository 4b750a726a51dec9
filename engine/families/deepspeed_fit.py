"""The DeepSpeed inner loop the array families (vae, ae, diffusion) share: a network,
a tensor of examples, a loss function, epochs → the trained network and its curve.

`fit_module` is a plain function: `trainer: local` runs it in the chain's process
(fp32 over a one-member gloo group on CPU; tests call it directly). `fit_module_ray`
runs it on Ray Train workers (a TorchTrainer; gloo on CPUs, NCCL and bf16-capable
DeepSpeed on GPUs), each on its shard of the examples, gradients averaged by DeepSpeed.
The language-model family has its own loop (engine/families/lm/train.py: packed token
blocks streamed from Ray Data)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np


@dataclass(frozen=True)
class TrainerParams:
    """Where an array family's fit runs; its Params inherit these fields."""

    trainer: Literal["local", "ray"] = "local"  # local: the chain's process; ray: Ray Train
    workers: int = 1  # Ray Train workers (trainer: ray)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def fit_module(make_net: Callable[[], Any], examples, loss: Callable[[Any, Any, Any], Any],
               epochs: float, batch_size: int, lr: float, seed: int,
               weight_decay: float = 0.0, threads: int = 0
               ) -> tuple[Any, list[tuple[int, float]]]:
    """Train a fresh `make_net()` on shuffled batches of `examples` (a tensor, first axis
    = examples) for `epochs`, AdamW with warmup + cosine decay. `loss(net, batch,
    generator)` gives the batch's mean loss; the generator makes any noise it draws
    reproducible. Returns the network in eval mode and the train-loss curve."""
    import deepspeed
    import torch

    from engine.families.lm.train import ensure_process_group

    if threads:
        torch.set_num_threads(threads)
    # Seeded before the network is built: its initial weights come from this seed, so
    # every strategy's generation 1 (same seed, same data) is the same model.
    torch.manual_seed(seed % 2**31)
    net = make_net()
    if len(examples) < batch_size:
        raise ValueError(f"family.batch_size: the mix holds {len(examples)} examples, fewer "
                         f"than one batch of {batch_size}")
    per_epoch = len(examples) // batch_size
    steps = max(1, int(round(epochs * per_epoch)))
    ensure_process_group()
    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        # torch_adam: DeepSpeed would otherwise JIT-compile its CPU Adam (≈50 s).
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay,
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": steps,
                                 "warmup_num_steps": max(1, steps // 20),
                                 "warmup_min_ratio": 0.0, "cos_min_ratio": 0.05,
                                 "warmup_type": "linear"}},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                           config=config)
    engine.train()
    order_gen = torch.Generator().manual_seed(seed % 2**31)
    noise_gen = torch.Generator().manual_seed((seed + 1) % 2**31)
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    step = 0
    log_every = max(1, steps // 50)
    while step < steps:
        order = torch.randperm(len(examples), generator=order_gen)
        for start in range(0, per_epoch * batch_size, batch_size):
            batch = examples[order[start:start + batch_size]].to(engine.device)
            value = loss(engine.module, batch, noise_gen)
            engine.backward(value)
            engine.step()
            step += 1
            window.append(float(value.detach()))
            if step % log_every == 0 or step == steps:
                curve.append((step, float(np.mean(window))))
                window = []
            if step >= steps:
                break
    return engine.module.eval(), curve


def _ray_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: an equal shard of the examples, the same fresh network (same
    seed) on every worker; rank 0 reports the trained weights and the curve as the fit's
    checkpoint (engine.raytrain.report_model)."""
    import json
    from pathlib import Path

    import ray
    import ray.train
    import torch

    from engine.raytrain import report_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    examples = ray.get(config["examples"][0])
    # Equal shards: workers that took different numbers of steps would wait for each
    # other's gradients forever.
    per_worker = len(examples) // world
    shard = torch.from_numpy(examples[rank * per_worker:(rank + 1) * per_worker])
    net, curve = fit_module(config["make_net"], shard, config["loss"], config["epochs"],
                            config["batch_size"], config["lr"], config["seed"],
                            config["weight_decay"], config["threads"])

    def save(out: Path) -> None:
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, out / "net.pt")
        (out / "curve.json").write_text(json.dumps(curve))

    report_model({"steps": curve[-1][0] if curve else 0}, save)


def fit_module_ray(make_net: Callable[[], Any], examples: np.ndarray,
                   loss: Callable[[Any, Any, Any], Any], epochs: float, batch_size: int,
                   lr: float, seed: int, weight_decay: float, threads: int, workers: int,
                   cpus_per_worker: float, gpus_per_worker: float, workdir
                   ) -> tuple[Any, list[tuple[int, float]]]:
    """`fit_module` on `workers` Ray Train workers; the trained network comes back as
    the fit's checkpoint, kept under `workdir` (an engine.files.Location: the chain's
    scratch directory in the run's storage, shared by every node)."""
    import json
    import tempfile
    from pathlib import Path

    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from engine.files import Location
    from engine.raytrain import run_callbacks

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    trainer = TorchTrainer(
        _ray_worker,
        # The examples travel once through the object store (a list keeps Ray from
        # resolving the reference before the workers ask for it).
        train_loop_config={"examples": [ray.put(np.ascontiguousarray(examples))],
                           "make_net": make_net, "loss": loss, "epochs": epochs,
                           "batch_size": batch_size, "lr": lr, "seed": seed,
                           "weight_decay": weight_decay, "threads": threads},
        torch_config=TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RunConfig(name="fit", **(Location.of(workdir) / "ray_train").storage(),
                             callbacks=run_callbacks()),
    )
    result = trainer.fit()
    torch.manual_seed(seed % 2**31)
    net = make_net()
    with tempfile.TemporaryDirectory() as d:
        out = Path(result.checkpoint.to_directory(d))
        net.load_state_dict(torch.load(out / "net.pt", weights_only=True))
        curve = [tuple(c) for c in json.loads((out / "curve.json").read_text())]
    return net.eval(), curve


def fit_with(p: Any, make_net: Callable[[], Any], examples: np.ndarray,
             loss: Callable[[Any, Any, Any], Any], seed: int, workdir
             ) -> tuple[Any, list[tuple[int, float]]]:
    """Dispatch on the family's `trainer`: in this process, or on Ray Train workers."""
    import torch

    common = (p.epochs, p.batch_size, p.lr, seed, getattr(p, "weight_decay", 0.0), p.threads)
    if p.trainer == "local":
        return fit_module(make_net, torch.from_numpy(examples), loss, *common)
    return fit_module_ray(make_net, examples, loss, *common, p.workers, p.cpus_per_worker,
                          p.gpus_per_worker, workdir)


def placement(p: Any) -> list:
    """Ray resources of a `trainer: ray` fit's workers, for the pre-run placement check.
    This and chain_cpus / chain_gpus are the array families' own interface functions
    (they import them under these names)."""
    from engine.families.base import Bundle

    if p.trainer != "ray":
        return []
    return [Bundle("trainer worker", {"CPU": p.cpus_per_worker, "GPU": p.gpus_per_worker},
                   {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"})] * p.workers


def chain_cpus(p: Any) -> float:
    return p.workers * p.cpus_per_worker if p.trainer == "ray" else 0.0


def chain_gpus(p: Any) -> float:
    return p.workers * p.gpus_per_worker if p.trainer == "ray" else 0.0
