"""kill -9 in the middle of a run, run again: the same table, value for value."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import collapse, collapse_exe, write_study
from engine.corpus import CorpusStore
from engine.spec import load_study

STUDY = """\
name: resume
family: {{name: linear, d: 4, T: [20, 40], sigma2: 1.0, trials: 300}}
strategies: [replace, accumulate, replace_multiple, subsample_with_replacement]
generations: 8
seeds: [3]
out: {out}
"""


def done(out: Path) -> int:
    return len(list(out.glob("trials/*/metrics/gen-*.json")))


def run_and_kill_after(study: Path, out: Path, generations_done: int) -> None:
    """Start `collapse run` and SIGKILL its whole process group (driver, Ray, workers)
    once `generations_done` generations are on disk."""
    proc = subprocess.Popen([collapse_exe(), "run", str(study)],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while done(out) < generations_done and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def sorted_table(out: Path) -> pd.DataFrame:
    t = pd.read_parquet(out / "results.parquet")
    return t.sort_values(["trial", "generation", "metric"]).reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.heavy  # (~2 min: four runs; tests/test_faults.py interrupts and resumes a study in the default suite)
def test_kill_9_then_rerun_gives_the_uninterrupted_table(tmp_path):
    reference = write_study(tmp_path / "ref.yaml", STUDY.format(out=tmp_path / "ref"))
    r = collapse("run", reference)
    assert r.returncode == 0, r.stderr

    out = tmp_path / "killed"
    study = write_study(tmp_path / "killed.yaml", STUDY.format(out=out))
    total = 8 * 8
    for at in (5, 30):
        run_and_kill_after(study, out, at)
        assert at <= done(out) < total, "the kill should land mid-run"
        assert not (out / "results.parquet").exists()
    r = collapse("run", study)
    assert r.returncode == 0, r.stderr
    assert "already on disk" in r.stderr and " 0 already on disk" not in r.stderr

    a, b = sorted_table(tmp_path / "ref"), sorted_table(out)
    pd.testing.assert_frame_equal(a.drop(columns="study"), b.drop(columns="study"),
                                  check_exact=True)
    # every (trial, generation, metric) exactly once; every store intact
    assert not b.duplicated(["trial", "generation", "metric"]).any()
    assert len(b[b.metric == "test_error"]) == total
    for trial in load_study(study).trials():
        store = CorpusStore(out / "trials" / trial.trial_id / "corpus")
        assert store.verify() == []
        # the last generation samples nothing (sample_last: false)
        assert set(store.entries()) == {"real-0001"} | {f"synthetic-{g:04d}" for g in range(1, 8)}

    # a finished study run again does no work and keeps the table
    r = collapse("run", study)
    assert r.returncode == 0 and "already complete" in r.stderr
    pd.testing.assert_frame_equal(sorted_table(out), b)


def test_chain_directory_of_another_study_is_refused(tmp_path):
    out = tmp_path / "out"
    first = write_study(tmp_path / "a.yaml", STUDY.format(out=out).replace("generations: 8", "generations: 1")
                        .replace("T: [20, 40]", "T: 20").replace("[replace, accumulate, replace_multiple, subsample_with_replacement]", "[replace]"))
    from engine.chain import run_chain
    study = load_study(first)
    run_chain(study.trials()[0], 1, out)
    before = sorted(str(p) for p in out.rglob("*"))
    r = collapse("run", first, "--set", "family.trials=100")
    assert r.returncode == 2
    assert "already holds chain replace__seed=3 run with other parameters" in r.stderr
    assert "family.trials: 300 on disk, 100 now" in r.stderr
    assert sorted(str(p) for p in out.rglob("*")) == before
    # A chain recorded by an engine that derived its draws another way is refused too:
    # its later generations would draw other numbers than its earlier ones did.
    from engine.records import read_record, write_record

    trial_file = out / "trials" / "replace__seed=3" / "trial.json"
    recorded = read_record(trial_file)
    assert recorded.pop("seed_scheme") == 3
    write_record(trial_file, recorded)  # as that engine wrote it (with its checksum)
    r = collapse("run", first)
    assert r.returncode == 2 and "made by an earlier engine" in r.stderr, r.stderr
    assert "(seed scheme 1, this engine's 3)" in r.stderr, r.stderr


def test_draws_depend_on_the_parameters_stated_not_on_defaults():
    """A parameter the family gains later, with a default that keeps the old behaviour,
    must leave every existing chain's seeds (and so its results) as they were."""
    from engine.families import get_family

    family = get_family("linear").from_params({"d": 3, "T": 20, "sigma2": 1.0})
    params = {"d": 3, "T": 20, "sigma2": 1.0, "ridge": 0.0, "trials": 2000}
    assert family.stated(params) == {"d": 3, "T": 20}  # sigma2, ridge, trials: defaults
    assert family.stated({**params, "ridge": 0.5})["ridge"] == 0.5
