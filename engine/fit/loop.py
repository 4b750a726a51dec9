"""The one training loop: DeepSpeed over a model factory, batches and a loss.

    model = build()                       seeded: the same seed gives the same weights
    engine = deepspeed.initialize(model)  AdamW, linear warmup then cosine decay, ZeRO
    for step in 1..steps:
        batch = next(batches).to(device)  the device this process runs on (fit/device.py);
                                          a batch is a tensor, or (examples, loss weights)
        loss(engine, batch, generator).backward(); engine.step()
    -> the trained module, its loss curve [(step, mean loss since the last point)]

Every family trains through `train`: the language models on packed token blocks, the
image and point families on examples. Ray Train runs it on each worker
(engine/fit/workers.py); `trainer: local`, tests and benchmarks call it directly.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator


from engine.errors import BadInput
from engine.fit.device import current_device, resolve_precision, use_threads

Curve = list[tuple[int, float]]
CHECKPOINT_TAG = "state"


@dataclass(frozen=True)
class LoopConfig:
    """Everything the loop reads besides the model, the batches and the loss."""

    steps: int
    batch_size: int  # examples per step on each worker (DeepSpeed's micro batch)
    lr: float
    warmup: float = 0.05  # fraction of the steps with a linear warmup
    min_lr_ratio: float = 0.1  # the cosine decays to lr × this
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    precision: str = "fp32"  # "fp32", "bf16", or "auto" (bf16 on GPUs that have it)
    zero_stage: int = 0
    seed: int = 0
    log_every: int = 10  # a curve point every this many steps
    threads: int = 0  # torch CPU threads; 0: torch's default
    # bf16 as torch.autocast over fp32 weights and optimizer (the image families' conv
    # nets), instead of DeepSpeed's bf16 mode, which holds the weights in bf16
    autocast: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def deepspeed_config(cfg: LoopConfig, precision: str) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        # torch_adam: DeepSpeed would otherwise JIT-compile its CPU Adam (≈50 s on 2 cores);
        # on GPUs torch's fused AdamW is as fast as DeepSpeed's.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.betas),
                                                  "eps": 1e-8, "weight_decay": cfg.weight_decay,
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": cfg.steps,
                                 "warmup_num_steps": max(1, int(cfg.warmup * cfg.steps)),
                                 "warmup_min_ratio": 0.0, "cos_min_ratio": cfg.min_lr_ratio,
                                 "warmup_type": "linear"}},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def ensure_process_group(device) -> None:
    """DeepSpeed needs torch.distributed. Ray Train sets it up on its workers; a plain
    process (trainer: local, tests, benchmarks) gets a one-member group: NCCL on a GPU,
    gloo on the CPU."""
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
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False,
                               init_method=f"file://{store.name}", rank=0, world_size=1)


def skip_shared_memory_comm_build() -> None:
    """Keep DeepSpeed on a CPU from JIT-compiling its shared-memory all-reduce op
    (`deepspeed_shm_comm`), which its communication backend builds the first time a
    process starts it: about 70 s of C++ on two cores on every fresh machine (and again
    whenever the virtual environment moves), before the quickstart's first step. The op
    only speeds CPU all-reduces among workers on one node; the engine's CPU fits are one
    process or Ray Train workers over gloo, and a GPU has no such op. DeepSpeed keeps
    its op table in one module dict whose edits persist (deepspeed/ops/__init__.py)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


Loss = Callable[[Any, Any, Any], Any]  # (engine, batch on the device, CPU generator) -> scalar


@dataclass
class Trained:
    """What `train` hands back: the DeepSpeed engine (its `module` is the trained
    network) and the loss curve. Read the weights through `full_weights` (ZeRO-3 keeps
    each worker's part only)."""

    engine: Any
    curve: Curve
    zero_stage: int
    first_step: int  # the step the loop (re)started at: 0, or a restored checkpoint's
    seconds: float  # wall time of the steps this call ran (set-up excluded)

    @property
    def module(self):
        return self.engine.module


@contextlib.contextmanager
def full_weights(trained: Trained) -> Iterator[Any]:
    """The trained module with all its weights in place. Under ZeRO-3 every worker
    holds a slice of each parameter, and a plain state_dict() is empty: the weights are
    gathered for the block. Collective: every worker must enter it."""
    if trained.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(trained.module.parameters())):
            yield trained.module
    else:
        yield trained.module


def train(build: Callable[[], Any], batches: Iterable, loss: Loss, cfg: LoopConfig,
          resume_from: str | None = None,
          on_step: Callable[[int, Curve, Callable[[str], None]], None] | None = None,
          ) -> Trained:
    """Train `build()` for `cfg.steps` steps on `batches` (tensors, first axis the batch).

    `loss(engine, batch, generator)`: the batch's mean loss; `engine` calls the model's
    forward; `generator` is a CPU generator seeded from cfg.seed for any noise the loss
    draws (VAE latents, diffusion steps), so a fit is reproducible and resumes exactly.
    `resume_from`: a directory `save` wrote; the loop goes on from its step with its
    weights, optimizer, schedule, curve and generator. `on_step(step, curve, save)` runs
    after every step; `save(directory)` writes such a checkpoint (every worker must call
    it: each writes its part)."""
    import deepspeed
    import torch

    use_threads(cfg.threads)
    device = current_device()
    if device.type == "cpu":
        skip_shared_memory_comm_build()
    ensure_process_group(device)
    torch.manual_seed(cfg.seed % 2**31)  # the initial weights come from the seed
    model = build()
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":  # fp32 matmuls and convolutions on tensor cores (TF32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = precision == "bf16" and cfg.autocast
    # device_rank: DeepSpeed would otherwise take the GPU numbered LOCAL_RANK, which need
    # not be the one Ray Train assigned this worker.
    args = argparse.Namespace(device_rank=device.index or 0) if device.type == "cuda" else None
    engine, _, _, _ = deepspeed.initialize(args=args, model=model,
                                           model_parameters=model.parameters(),
                                           config=deepspeed_config(
                                               cfg, "fp32" if autocast else precision))
    engine.train()
    generator = torch.Generator().manual_seed((cfg.seed + 1) % 2**31)
    step, curve = 0, []
    if resume_from is not None:
        _, state = engine.load_checkpoint(resume_from, tag=CHECKPOINT_TAG)
        step, curve = int(state["step"]), [tuple(x) for x in state["curve"]]
        generator.set_state(state["generator"])
    first_step = step

    def save(directory: str) -> None:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state={
            "step": step, "curve": [list(c) for c in curve], "generator": generator.get_state()})

    # The losses since the last curve point are summed on the device and read once per
    # point: reading every step's loss would wait for the device each step.
    window_sum, window_steps = None, 0
    started = time.perf_counter()
    for batch in batches:
        if step >= cfg.steps:
            break
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            value = loss(engine, to_device(batch, engine.device), generator)
        engine.backward(value)
        engine.step()
        step += 1
        value = value.detach().double()
        window_sum = value if window_sum is None else window_sum + value
        window_steps += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            curve.append((step, float(window_sum) / window_steps))
            window_sum, window_steps = None, 0
        if on_step is not None:
            on_step(step, curve, save)
    if window_steps:
        curve.append((step, float(window_sum) / window_steps))
    if step < cfg.steps:
        raise RuntimeError(f"the batches ran out after {step} of {cfg.steps} steps")
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)  # the steps' kernels finish before the clock stops
    seconds = time.perf_counter() - started
    engine.eval()
    return Trained(engine=engine, curve=curve, zero_stage=cfg.zero_stage, first_step=first_step,
                   seconds=seconds)


def to_device(batch, device):
    """A batch on the device: a tensor, or a tuple of them (examples, loss weights)."""
    if isinstance(batch, tuple):
        return tuple(t.to(device, non_blocking=True) for t in batch)
    return batch.to(device, non_blocking=True)


def split_weights(batch):
    """(examples, per-example loss weights or None) of a batch: a weighted mix's batches
    are (examples, weights) tuples (a workflow's `weights`; see strategies.Mix)."""
    return batch if isinstance(batch, tuple) else (batch, None)


def weighted_mean(losses, weights):
    """The batch's loss from per-example (or per-token) losses: their mean, each times
    its weight where the mix is weighted. The weights average 1 over the mix
    (strategies.Mix.row_weights), so this is an unbiased estimate of the weighted
    objective and keeps the unweighted loss's scale (a learning rate tuned without
    weights still fits); dividing by the batch's own weight sum instead would bias it."""
    return losses.mean() if weights is None else (losses * weights.to(losses.dtype)).mean()


def truncated(cross_entropy, threshold: float):
    """Truncated cross-entropy (Shabgahi et al. 2025, "ForTIFAI"): each term whose
    likelihood exp(−CE) is already above `threshold` set to 0, with its gradient (the
    mask selects, it does not scale); the language models' tokens, the VAE's pixels."""
    import torch

    return cross_entropy * (torch.exp(-cross_entropy.detach()) <= threshold)


def shuffled_batches(examples, batch_size: int, seed: int, weights=None) -> Iterator:
    """In-memory examples (a tensor, first axis = examples) in batches, reshuffled every
    epoch from `seed`, endlessly: the loop stops at its step count. With `weights` (one
    per example) each batch is (examples, their weights)."""
    import torch

    if len(examples) < batch_size:
        raise BadInput(f"family.batch_size: the mix holds {len(examples)} examples, fewer "
                         f"than one batch of {batch_size}")
    order_gen = torch.Generator().manual_seed(seed % 2**31)
    per_epoch = len(examples) // batch_size
    while True:
        order = torch.randperm(len(examples), generator=order_gen)
        for start in range(0, per_epoch * batch_size, batch_size):
            picked = order[start:start + batch_size]
            yield examples[picked] if weights is None else (examples[picked], weights[picked])
