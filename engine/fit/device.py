"""Which device an inner loop runs on, and in which precision.

One rule for every loop (training, evaluation, sampling): the device comes from where
the code runs — the GPU Ray Train gave this worker, else a GPU this process can see,
else the CPU — never from a default argument. Batches are moved to it by the loop.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

log = logging.getLogger("engine.fit")


def current_device() -> "torch.device":
    """The device of this process: Ray Train's for its workers (the GPU it assigned,
    `ray.train.torch.get_device()`), CUDA where this process sees a GPU, else the CPU."""
    import torch

    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except (ImportError, RuntimeError):  # not a Ray Train worker
        pass
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def resolve_precision(requested: str, device: "torch.device") -> str:
    """`auto` is bf16 on GPUs that compute in it (Ampere and later) and fp32 everywhere
    else: CPUs, and older GPUs (V100, T4), where bf16 is emulated or missing."""
    if requested != "auto":
        return requested
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if device.type == "cuda":
        log.warning("precision auto: %s has no bf16; training in fp32",
                    torch.cuda.get_device_name(device))
    return "fp32"


def use_threads(threads: int) -> None:
    """Give torch the CPU threads this process was given (0: leave torch's default).
    Ray starts task and actor processes with one thread unless told otherwise."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_on_gpu(gpus: float, cpus: float, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` where the study's GPUs are: here, if this process sees a GPU or the
    study gives none (`gpus` = 0); otherwise in a Ray task that holds `gpus` of one
    (evaluation of a 126M-parameter model on a CPU takes hours, on a GPU seconds)."""
    import torch

    if not gpus or torch.cuda.is_available():
        return fn(*args)
    import ray

    return ray.get(ray.remote(fn).options(num_gpus=gpus, num_cpus=cpus, max_retries=1)
                   .remote(*args))
