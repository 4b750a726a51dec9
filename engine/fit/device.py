"""Which device an inner loop runs on, and in which precision.

One rule for every loop (training, evaluation, sampling): a GPU only where Ray reserved
one for this process. A Ray process (a chain's driver, a trainer worker, a sampler
actor, an evaluation task) runs on the GPU Ray assigned it (`ray.get_gpu_ids()`; Ray
Train's own device on its workers) and on the CPU when Ray assigned none, even where it
sees GPUs: Ray no longer hides a node's GPUs from processes that reserved none, and a
chain's driver lands on GPU nodes beside trainers and vLLM engines that hold 90% of a
GPU's memory. Such a process never initialises CUDA. Outside Ray (tests, benchmarks,
bench/gpu_check.py's inner layer) a process takes the GPU it sees, else the CPU.
Batches are moved to the device by the loop; no loop takes a device from a default
argument.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch

log = logging.getLogger("engine.fit")


def device_rule(ray_worker: bool, assigned_gpus: Sequence, cuda_visible: Callable[[], bool],
                visible_devices: str | None = None) -> str:
    """The rule on its inputs: "cpu" or "cuda:i". `ray_worker`: this process is a Ray
    task or actor; `assigned_gpus`: the GPU ids Ray reserved for it; `cuda_visible`:
    asked only outside Ray (so a Ray process never initialises CUDA);
    `visible_devices`: $CUDA_VISIBLE_DEVICES, which Ray sets to the assigned ids (the
    first assigned is then torch's device 0)."""
    if ray_worker:
        if not assigned_gpus:
            return "cpu"
        first = str(assigned_gpus[0])
        visible = [d.strip() for d in (visible_devices or "").split(",") if d.strip()]
        return f"cuda:{visible.index(first) if first in visible else int(first)}"
    return "cuda:0" if cuda_visible() else "cpu"


def run_here_rule(gpus: float, ray_worker: bool, ray_running: bool, assigned_gpus: Sequence,
                  cuda_visible: Callable[[], bool]) -> bool:
    """Whether work that wants `gpus` of a GPU runs in this process (else in a Ray task
    that reserves them): when it wants none, when Ray gave this process a GPU, or,
    outside Ray, when this process sees one or no Ray is running to reserve one."""
    if not gpus:
        return True
    if ray_worker:
        return bool(assigned_gpus)
    return not ray_running or cuda_visible()


def _ray_state() -> tuple[bool, bool, list]:
    """(a Ray task or actor?, Ray running here?, the GPU ids Ray assigned this process)."""
    try:
        import ray
    except ImportError:  # bench/gpu_check.py's inner layer runs without Ray
        return False, False, []
    if not ray.is_initialized():
        return False, False, []
    worker = ray.get_runtime_context().worker
    if worker.mode != ray.WORKER_MODE:
        return False, True, []
    return True, True, list(ray.get_gpu_ids())


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def current_device() -> "torch.device":
    """The device of this process (the module's rule): Ray Train's on its workers."""
    import torch

    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except (ImportError, RuntimeError):  # not a Ray Train worker
        pass
    ray_worker, _, assigned = _ray_state()
    return torch.device(device_rule(ray_worker, assigned, _cuda_visible,
                                    os.environ.get("CUDA_VISIBLE_DEVICES")))


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
    """`fn(*args)` where the study's GPUs are: in this process when the module's rule
    lets it (`run_here_rule`), else in a Ray task that reserves `gpus` of one
    (evaluation of a 126M-parameter model on a CPU takes hours, on a GPU seconds)."""
    ray_worker, ray_running, assigned = _ray_state()
    if run_here_rule(gpus, ray_worker, ray_running, assigned, _cuda_visible):
        return fn(*args)
    import ray

    return ray.get(ray.remote(fn).options(num_gpus=gpus, num_cpus=cpus, max_retries=1)
                   .remote(*args))
