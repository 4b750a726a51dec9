"""One study run: the checks made before Ray starts, the sweep, the results table and
the run's record (runs.json)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    import pandas as pd

    from engine.spec import Study


# Written first into an out a run starts in: what says the directory is a run of this
# engine, so that a later run writes there (an out holding anything else is refused).
RUN_MARK = ".collapse-run"
RUN_LOCK = "RUN.lock"  # held by the live `collapse run` of an out


def check_out_is_a_run(study: "Study") -> None:
    """Refuse an `out` that exists, is not empty and is not a run of this engine: the
    run would write study.yaml, results.csv, report.html... over the files there."""
    from engine.errors import SpecError
    from engine.files import Location

    out = Location.of(study.out)
    if not out.exists():
        return
    names = sorted(c.name for c in out.children())
    # the mark, or what only a run writes (an older engine's runs wrote no mark)
    if not names or {RUN_MARK, "runs.json", "trials", "real", "shared", "tune"} & set(names):
        return
    raise SpecError(f"{study.source}: out: {out} exists and holds files this engine did "
                    f"not write ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); "
                    "choose another out (--set out=DIR), or empty it")


@contextmanager
def holding(out) -> Iterator[None]:
    """The live run's hold on its `out`: RUN.lock, naming this host, process and
    command, taken over only from a process known dead (engine/files/locks.py: a lock's
    owner). A second run into the same out is refused, naming the first. An object
    store has no atomic create: there the run holds nothing."""
    import json
    import os
    import sys

    from engine.errors import SpecError
    from engine.files import lock_owner, owner_gone

    if not out.is_local:
        yield
        return
    path = out.local_path / RUN_LOCK
    created = not out.local_path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if owner_gone(path):
                path.unlink(missing_ok=True)  # its run was killed: take it over
                continue
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            raise SpecError(f"out: {out} is in use by another collapse run (host "
                            f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}: "
                            f"{holder.get('command', '?')}); wait for it to end, or stop "
                            "it") from None
    with os.fdopen(fd, "w") as f:
        json.dump({**lock_owner(), "command": " ".join(sys.argv)}, f)
    try:
        (out.local_path / RUN_MARK).touch()
        yield
    finally:
        path.unlink(missing_ok=True)
        if created and [p.name for p in out.local_path.iterdir()] == [RUN_MARK]:
            # refused before any work (a study the cluster cannot hold): nothing left
            (out.local_path / RUN_MARK).unlink()
            out.local_path.rmdir()


def check_fits_this_machine(study: "Study") -> None:
    """A study run on this machine whose chain needs more memory than the machine has
    is refused with the numbers, before Ray starts (a cluster's nodes are checked once
    it is reached: engine/cluster.py)."""
    import psutil

    from engine.cluster import chain_memory
    from engine.errors import SpecError

    total = psutil.virtual_memory().total
    need, trial = max(((chain_memory(study, t), t) for t in study.trials()),
                      key=lambda pair: pair[0])
    if need > total:
        raise SpecError(f"{study.source}: chain {trial.trial_id} needs ~{need / 2**30:,.0f} "
                        f"GiB of memory (the family's estimate, or resources.memory_per_trial); "
                        f"this machine has {total / 2**30:,.0f} GiB: make the study smaller, "
                        "or run it on a cluster (--address)")


def check_out_directory(study: "Study") -> None:
    """Refuse, before writing anything, a study whose `out` holds a different run: chains
    run with other parameters, or chains and generations this study would leave out of
    its results table (fewer strategies, seeds, grid points or generations)."""
    from engine.chain import recorded_trial_mismatch
    from engine.layout import RunLayout
    from engine.errors import SpecError

    where = f"{study.source}: out: {study.out}"
    trials = {t.trial_id: t for t in study.trials()}
    for trial in trials.values():
        mismatch = recorded_trial_mismatch(study.out, trial)
        if mismatch:
            raise SpecError(f"{where} already holds chain {trial.trial_id} run with other "
                            f"parameters ({mismatch}); choose another out (--set out=DIR) or "
                            "delete that run")
    for chain in RunLayout.of(study.out).chains():
        name = chain.root.name
        done = 0
        while chain.metrics(done + 1).exists():
            done += 1
        if not done:
            continue
        if name not in trials:
            raise SpecError(f"{where} holds chain {name} ({done} generations), which this "
                            "study does not run: results.parquet would lose its rows; run "
                            "the study it belongs to, or choose another out (--set out=DIR)")
        if done > trials[name].generations:
            raise SpecError(f"{where} holds {done} generations of chain {name}, this study "
                            f"asks for {trials[name].generations}: results.parquet would lose "
                            f"the rest; set generations to at least {done}, or choose another "
                            "out (--set out=DIR)")


def run_study(study: "Study | str | Path", overrides: Sequence[str] = (),
              address: str | None = None, verbose: bool = False,
              say=None) -> "pd.DataFrame":
    """Run (or resume) every chain of a study; return and save the tidy table.

    Everything that needs no cluster is checked before Ray starts (15-20 s): the study,
    what `out` already holds, whether `out` can be written and is free, whether
    anything is left to do."""
    import sys

    from engine import results, tracking
    from engine.chain import completed_generations
    from engine.layout import RunLayout
    from engine.spec import Study

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    if not isinstance(study, Study):
        from engine.spec import load_study

        study = load_study(study, overrides)
    address = address or study.resources.address
    run = RunLayout.of(study.out)  # a path or an object-store URI
    _check_before_ray(study, run, address)
    trials = study.trials()
    trackers: list = []
    with holding(run.out):
        if all(completed_generations(run.out, t) >= t.generations for t in trials):
            say(f"[{study.name}] all {len(trials)} chains already complete in {run.out}")
        else:
            trackers = _sweep(study, run, address, verbose, say)
        table = results.collect(study)
        results.write(table, run.out)
    tracking.attach_results(study, trackers, run)
    return table


def _check_before_ray(study: "Study", run, address: str | None) -> None:
    """What can be refused in seconds, before Ray starts and anything is written."""
    from engine import tracking
    from engine.cluster import check_reachable
    from engine.errors import SpecError
    from engine.files import StorageError, check_writable
    from engine.records import read_runs

    check_out_is_a_run(study)
    check_out_directory(study)
    if address in (None, "local"):
        check_fits_this_machine(study)
    read_runs(run.run_facts)  # a damaged record of past runs: named now, not after Ray
    check_reachable(address)
    try:  # a missing bucket, no credentials, a read-only mount: one line, now
        check_writable(run.out)
    except StorageError as e:
        raise SpecError(f"{study.source}: out: {e}") from None
    tracking.check(study)


def _sweep(study: "Study", run, address: str | None, verbose: bool, say) -> list:
    """Ray up, the real data prepared once, every unfinished chain run; the trackers."""
    import sys
    import time

    import yaml

    from engine import tracking
    from engine.chain import real_seed
    from engine.cluster import check_fits_cluster, ray_connection, run_facts
    from engine.families import family_for
    from engine.files import write_atomic
    from engine.sweep import run_sweep

    with ray_connection(address, verbose=verbose):
        check_fits_cluster(study)
        # Work on real data done once per study (the LM's tokenized corpus), before
        # any chain starts: no chain repeats it.
        for trial in study.trials():
            prepared = family_for(trial).prepare(real_seed(trial), run.real_cache)
            if prepared:
                say(f"[{study.name}] {prepared}")
        write_atomic(run.study_file, lambda tmp: tmp.write_text(
            yaml.safe_dump(study.document, sort_keys=False)))
        trackers = tracking.callbacks(study)
        facts = {**run_facts(), "command": " ".join(sys.argv),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        _record_run(run, facts)  # now: an interrupted run is on record too
        start = time.monotonic()
        run_sweep(study, say=say, trackers=trackers)
        _record_run(run, {**facts, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                          "seconds": round(time.monotonic() - start, 1)})
    return trackers


def _record_run(run, facts: dict) -> None:
    """runs.json: one entry per `collapse run` of this out (a resumed study has several);
    the entry of the run in progress is replaced when it finishes."""
    import json

    from engine.files import write_atomic

    from engine.records import read_runs

    runs = read_runs(run.run_facts)
    if runs and runs[-1].get("started") == facts["started"]:
        runs[-1] = facts
    else:
        runs.append(facts)
    write_atomic(run.run_facts, lambda tmp: tmp.write_text(json.dumps(runs, indent=1)))
