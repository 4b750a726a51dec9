"""One study run: the checks made before Ray starts, the sweep, the results table and
the run's record (runs.json)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import pandas as pd

    from engine.spec import Study


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
    what `out` already holds, whether `out` can be written, whether anything is left to
    do."""
    import sys
    import time

    import yaml

    from engine import results, tracking
    from engine.chain import completed_generations, real_seed
    from engine.cluster import check_fits_cluster, check_reachable, ray_connection, run_facts
    from engine.files import StorageError, check_writable, write_atomic
    from engine.families import family_for
    from engine.layout import RunLayout
    from engine.errors import SpecError
    from engine.spec import Study
    from engine.sweep import run_sweep

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    if not isinstance(study, Study):
        from engine.spec import load_study

        study = load_study(study, overrides)
    check_out_directory(study)
    address = address or study.resources.address
    check_reachable(address)
    run = RunLayout.of(study.out)  # a path or an object-store URI
    try:  # a missing bucket, no credentials, a read-only mount: one line, now
        check_writable(run.out)
    except StorageError as e:
        raise SpecError(f"{study.source}: out: {e}") from None
    tracking.check(study)
    trials = study.trials()
    trackers: list = []
    if all(completed_generations(run.out, t) >= t.generations for t in trials):
        say(f"[{study.name}] all {len(trials)} chains already complete in {run.out}")
    else:
        with ray_connection(address, verbose=verbose):
            check_fits_cluster(study)
            # Work on real data done once per study (the LM's tokenized corpus), before
            # any chain starts: no chain repeats it.
            for trial in trials:
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
    table = results.collect(study)
    results.write(table, run.out)
    tracking.attach_results(study, trackers, run)
    return table


def _record_run(run, facts: dict) -> None:
    """runs.json: one entry per `collapse run` of this out (a resumed study has several);
    the entry of the run in progress is replaced when it finishes."""
    import json

    from engine.files import write_atomic

    runs = json.loads(run.run_facts.read_text()) if run.run_facts.exists() else []
    if runs and runs[-1].get("started") == facts["started"]:
        runs[-1] = facts
    else:
        runs.append(facts)
    write_atomic(run.run_facts, lambda tmp: tmp.write_text(json.dumps(runs, indent=1)))
