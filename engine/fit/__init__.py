"""Fitting: the one DeepSpeed training loop (loop.py), where it runs — this process or
Ray Train workers (workers.py) — and the device rule every inner loop follows
(device.py). It turns (a model factory, batches, a loss) into a trained model and knows
nothing of stories or images."""
from engine.fit.device import current_device, resolve_precision, run_on_gpu, use_threads
from engine.fit.loop import (Curve, LoopConfig, Trained, ensure_process_group, full_weights,
                             shuffled_batches, split_weights, train, truncated,
                             weighted_mean)
from engine.fit.workers import (FIT_RECORD, FitContext, FitJob, Workers, fit_here,
                                fit_on_workers, read_record)

__all__ = ["current_device", "resolve_precision", "run_on_gpu", "use_threads", "Curve",
           "LoopConfig", "Trained", "ensure_process_group", "full_weights",
           "shuffled_batches", "split_weights", "train", "truncated", "weighted_mean",
           "FIT_RECORD", "FitContext", "FitJob", "Workers", "fit_here", "fit_on_workers",
           "read_record"]
