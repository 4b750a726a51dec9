"""Progress of a chain's long work (a fit, a sampling pass): done of total, rate, ETA.

The work runs in other processes (Ray Train workers, sampler actors), so the chain
learns how far it got from what that work leaves in the run's storage: a fit's rank 0
writes `progress.json` into the fit's scratch directory every PROGRESS_SECONDS; each
sampler actor writes the rows it made into a file of its own (the chain sums them, or
counts the rows of the Parquet files written so far, whichever is further). While
the work runs, a thread in the chain's process (`watching`) looks every
PROGRESS_SECONDS, logs a line with rate and ETA to the chain's log (often at first, then
at most every LINE_SECONDS: a fit of hours gets ~100 lines), and writes the chain's
`progress.json`. Tune (and so the Ray dashboard) gets the same fields: a fit's from its
workers' reports every TUNE_REPORT_SECONDS (engine/fit/workers.py), a sampling pass's
from the chain's trial, which reads `progress.json` (engine/sweep.py). One writer per
file.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from engine.files import Location, write_json

log = logging.getLogger(__name__)

# How often progress is written and looked at (COLLAPSE_PROGRESS_SECONDS: the tests
# look more often; Ray's workers inherit the variable from the process that started Ray).
PROGRESS_SECONDS = float(os.environ.get("COLLAPSE_PROGRESS_SECONDS", "5"))
LINE_SECONDS = 60.0  # the longest gap between two progress lines in a chain's log
# How often a fit on Ray Train reports its progress to Tune: a report is collective and
# costs every worker a pause, so far less often than the chain's log is fed.
TUNE_REPORT_SECONDS = 12 * PROGRESS_SECONDS


@dataclass(frozen=True)
class Progress:
    """How far one phase of one generation got, as the chain's progress.json holds it."""

    generation: int
    phase: str  # "fit" or "sampling"
    done: int
    total: int
    unit: str  # "steps" or "stories"
    per_second: float | None  # None until two looks apart have seen work done
    eta_seconds: float | None
    seconds: float  # since the phase started

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 0.0
        text = f"generation {self.generation}: {self.phase} {self.done}/{self.total} " \
               f"{self.unit} ({pct:.0f}%) after {self.seconds:.0f} s"
        if self.per_second:
            text += f", {self.per_second:.3g} {self.unit}/s, ~{self.eta_seconds:.0f} s left"
        return text


def read_progress(where: Location) -> Progress | None:
    """A chain's latest progress record; None when it has none (or it is being written)."""
    try:
        return Progress(**json.loads(where.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


class StepProgress:
    """What a fit's worker calls every step: rank 0 (`where` given) writes {step, steps}
    to `where` (a path or URI in the run's storage) at most every PROGRESS_SECONDS;
    every rank can say its rate and ETA for a report to Tune (`as_metrics`)."""

    def __init__(self, where: str | None, steps: int):
        self.where = Location.of(where) if where else None
        self.steps = steps
        self.last = time.monotonic()
        self.first: tuple[float, int] | None = None  # (when, step) at the first step seen

    def __call__(self, step: int) -> None:
        if self.first is None:
            self.first = (time.monotonic(), step)
        if self.where is None or time.monotonic() - self.last < PROGRESS_SECONDS:
            return
        self.last = time.monotonic()
        try:
            write_json(self.where, {"done": step, "total": self.steps})
        except OSError as e:  # progress is a courtesy: a failed write never stops a fit
            log.debug("fit progress not written to %s: %s", self.where, e)

    def as_metrics(self, step: int) -> dict[str, float | int | str]:
        """The progress fields of a Tune result (the names the chain's trial reports
        for sampling too: engine/sweep.py)."""
        metrics: dict[str, float | int | str] = {"progress_phase": "fit", "progress_done": step,
                                                 "progress_total": self.steps}
        if self.first is not None and step > self.first[1]:
            rate = (step - self.first[1]) / max(1e-9, time.monotonic() - self.first[0])
            metrics["progress_per_second"] = rate
            metrics["progress_eta_seconds"] = (self.steps - step) / rate
        return metrics


class RowsProgress:
    """What a sampler actor calls per batch: the rows it made so far, written to a file
    of its own in the directory `where` at most every PROGRESS_SECONDS (one writer per
    file: actors run side by side, on any node)."""

    def __init__(self, where: str | None):
        import uuid

        self.where = Location.of(where) / f"{uuid.uuid4().hex}.json" if where else None
        self.rows = 0
        self.last = time.monotonic()

    def add(self, rows: int) -> None:
        self.rows += rows
        if self.where is None or time.monotonic() - self.last < PROGRESS_SECONDS:
            return
        self.last = time.monotonic()
        try:
            write_json(self.where, {"done": self.rows})
        except OSError as e:  # progress is a courtesy: a failed write never stops sampling
            log.debug("sampling progress not written to %s: %s", self.where, e)


def rows_sampled(where: Location) -> int:
    """The rows every sampler actor of a pass last wrote into the directory `where`."""
    total = 0
    for f in where.children():
        try:
            total += int(json.loads(f.read_text())["done"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue
    return total


def fit_steps(where: Location) -> tuple[int, int]:
    """(steps done, steps in all) as a fit's rank 0 last wrote them to `where`; (0, 0)
    before its first write."""
    try:
        record = json.loads(where.read_text())
        return int(record["done"]), int(record["total"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return 0, 0


@contextmanager
def watching(label: str, generation: int, phase: str, unit: str,
             read: Callable[[], tuple[int, int]], record: Location,
             every: float = PROGRESS_SECONDS) -> Iterator[None]:
    """While the body runs: every `every` seconds, ask `read()` how far the work got
    (done, total); when it moved, log a progress line (`label` first) and write it to
    `record`. The rate is measured from the first look that saw work done, so the start-up before
    (a worker group, an inference engine) does not count against it."""
    stop = threading.Event()
    start = time.monotonic()
    last_line = [start]

    def look() -> None:
        first: tuple[float, int] | None = None  # (when, done) at the first look with work done
        shown = -1
        while not stop.wait(every):
            try:
                now, (count, total) = time.monotonic(), read()
                count = min(count, total)
            except Exception as e:  # noqa: BLE001 — a look that fails is skipped, not fatal
                log.debug("%s: progress not read: %s", label, e)
                continue
            if count <= 0 or count == shown:
                continue
            rate = eta = None
            if first is None:
                first = (now, count)
            elif now > first[0] and count > first[1]:
                rate = (count - first[1]) / (now - first[0])
                eta = (total - count) / rate
            progress = Progress(generation, phase, count, total, unit, rate, eta, now - start)
            # Lines come every look at first, then further apart as the work goes on.
            if now - last_line[0] >= min(LINE_SECONDS, (now - start) / 10) or shown < 0 \
                    or count == total:
                log.info("%s: %s", label, progress.line())
                last_line[0] = now
            try:
                write_json(record, asdict(progress))
            except OSError as e:
                log.debug("%s: progress not written: %s", label, e)
            shown = count

    thread = threading.Thread(target=look, name=f"progress {label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
