"""The DeepSpeed inner loop the array families (vae, ae, diffusion) share: a network,
a tensor of examples, a loss function, epochs → the trained network and its curve.

A plain function, run in the chain's process (tests and benchmarks call it directly);
fp32 over a one-member gloo group on CPU. The language-model family has its own loop
(engine/families/lm/train.py: packed token blocks, Ray Train workers)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


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
            value = loss(engine.module, examples[order[start:start + batch_size]], noise_gen)
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
