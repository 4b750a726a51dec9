"""Nothing silently wrong: corrupt corpora stop a chain in one line, interrupts exit
honestly, `collapse run` uses its own Ray, a results table never shrinks, bad requests
to `table` and `plot` name what is wrong, and nothing waits on Ray that needs none."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, collapse, collapse_exe, write_study

LINEAR = """\
name: faults
family: {{name: linear, d: 3, T: 20, sigma2: 1.0, trials: 40}}
strategies: [replace, accumulate]
generations: {generations}
seeds: [0]
out: {out}
"""


def _run(tmp_path, name="s", generations=3, out=None, *extra):
    out = out or tmp_path / "out"
    study = write_study(tmp_path / f"{name}.yaml", LINEAR.format(generations=generations, out=out))
    return study, out, collapse("run", study, *extra)


def _table(out):
    t = pd.read_parquet(out / "results.parquet")
    return t.sort_values(["trial", "generation", "metric"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-generation study, and a reference run of the same study to 4; the
    first run's completed process."""
    tmp = tmp_path_factory.mktemp("faults")
    study, out, first = _run(tmp)
    assert first.returncode == 0, first.stderr
    _, ref, r = _run(tmp, "ref", 4, tmp / "ref")
    assert r.returncode == 0, r.stderr
    return (study, out, ref), first


@pytest.fixture(scope="module")
def finished(finished_run):
    return finished_run[0]


@pytest.mark.slow
# Both in make test-heavy (~1 min each: it also deletes the shard and resamples it); the
# default suite cuts a shard short and repairs it in tests/test_probe.py (the shared
# generation-1 corpus).
@pytest.mark.heavy
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_stops_the_chain_in_one_line_and_deleting_it_samples_it_again(
        tmp_path, finished, damage):
    import shutil

    study0, out0, ref = finished
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    study = write_study(tmp_path / "s.yaml", LINEAR.format(generations=3, out=out))
    shard = out / "trials" / "accumulate__seed=0" / "corpus" / "synthetic-0002" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    before = (out / "results.parquet").read_bytes()

    r = collapse("run", study, "--set", "generations=4")
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("chain accumulate__seed=0 stopped at generation 4, reading the "
                           f"training mix: {shard}: checksum mismatch"), r.stderr[-2000:]
    assert f"delete {shard.parent} to have the chain sample it again" in last
    assert last.endswith(f"(details: {out / 'trials' / 'accumulate__seed=0' / 'chain.log'})")
    assert "Traceback" not in r.stderr
    assert (out / "results.parquet").read_bytes() == before  # no half table written
    if damage == "truncate":
        return  # the repair below is the same for both

    shutil.rmtree(shard.parent)  # what the message says to do
    r = collapse("run", study, "--set", "generations=4")
    assert r.returncode == 0, r.stderr[-2000:]
    # the corpus sampled again is the same (same seeds), so generation 4 is too
    pd.testing.assert_frame_equal(_table(out).drop(columns="study"),
                                  _table(ref).drop(columns="study"), check_exact=True)
    from engine.corpus import CorpusStore

    assert CorpusStore(shard.parent.parent).verify() == []


@pytest.mark.slow
def test_fewer_generations_or_strategies_into_a_finished_out_are_refused(finished):
    study, out, _ = finished
    before = (out / "results.parquet").read_bytes()
    r = collapse("run", study, "--set", "generations=2")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"{study}: out: {out} holds 3 generations of chain accumulate__seed=0, this study asks "
        "for 2: results.parquet would lose the rest; set generations to at least 3, or choose "
        "another out (--set out=DIR)")
    r = collapse("run", study, "--set", "strategies=[accumulate]")
    assert r.returncode == 2
    assert "holds chain replace__seed=0 (3 generations), which this study does not run" \
        in r.stderr
    assert (out / "results.parquet").read_bytes() == before


@pytest.mark.slow
def test_table_and_plot_name_what_is_wrong(finished, tmp_path):
    _, out, _ = finished
    r = collapse("plot", out, "--metric", "nosuch", "--out", tmp_path / "plots")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("no metric 'nosuch' in the table (it has: ")
    assert not (tmp_path / "plots").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.parquet").write_bytes(b"PAR1 not really a parquet file")
    for command in ("table", "plot"):  # no checksum beside it, no study to rebuild it from
        r = collapse(command, bad)
        assert r.returncode == 2
        assert r.stderr.strip() == (
            f"{bad / 'results.parquet'}: no checksum beside it (results.parquet.sha256); run "
            "`collapse run` on its study again to rebuild it from the chains' metrics")


@pytest.mark.slow
def test_a_finished_study_and_an_unwritable_out_need_no_ray(finished, tmp_path, monkeypatch):
    """Both are answered before Ray starts (it takes 15-20 s)."""
    import ray

    import engine
    from engine.spec import SpecError

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    study, out, _ = finished
    lines = []
    table = engine.run_study(study, say=lines.append)
    assert lines == [f"[faults] all 2 chains already complete in {out}"]
    assert len(table) == len(pd.read_parquet(out / "results.parquet"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SpecError, match=f"out: {blocker / 'run'}: cannot write there"):
        engine.run_study(study, overrides=[f"out={blocker / 'run'}"])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.heavy)])
def test_an_interrupt_exits_non_zero_says_how_to_resume_and_keeps_the_work(tmp_path, signum):
    out = tmp_path / "out"
    study = write_study(tmp_path / "s.yaml", LINEAR.format(generations=30, out=out))
    proc = subprocess.Popen([collapse_exe(), "run", str(study)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while len(list(out.glob("trials/*/metrics/gen-*.json"))) < 4:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"[faults] stopped by {signal.Signals(signum).name}; finished generations are kept in "
        f"{out}: run `collapse run {study}` to resume")
    assert "results:" not in stdout and not (out / "results.parquet").exists()
    assert "Traceback" not in stderr
    kept = len(list(out.glob("trials/*/metrics/gen-*.json")))
    assert kept >= 4
    if signum == signal.SIGTERM:
        return  # resuming is the same after either signal
    r = collapse("run", study)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{kept} already on disk" in r.stderr
    assert len(_table(out).query("metric == 'test_error'")) == 60


@pytest.mark.slow
@pytest.mark.heavy  # (~40 s: a second Ray head on this machine; make test-heavy)
def test_without_an_address_collapse_runs_on_a_ray_of_its_own(tmp_path):
    """A Ray already running on this machine (`ray start --head`, one CPU, the default
    temp dir, where ray.init() would find it) is not joined: a study whose chains need
    1.5 CPUs would be refused there, and runs on a Ray of its own."""
    import socket

    import psutil
    from ray._common.utils import get_ray_address_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    address_file = Path(get_ray_address_file(None))
    saved = address_file.read_text() if address_file.exists() else None
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head",
                             "--block", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (address_file.exists() and f":{port}" in address_file.read_text()):
            assert head.poll() is None and time.time() < deadline, "ray start failed"
            time.sleep(0.2)
        study = write_study(tmp_path / "s.yaml", LINEAR.format(generations=1, out=tmp_path / "out")
                            + "resources: {cpus_per_trial: 1.5}\n")
        r = subprocess.run([collapse_exe(), "run", str(study)], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        # only this head's processes: their command lines name its port
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(a.endswith(f":{port}") or a.endswith(f"={port}")
                       for a in p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        if saved is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(saved)


@pytest.mark.slow
def test_run_shows_the_engines_lines_only(finished_run):
    r = finished_run[1]
    lines = r.stderr.strip().splitlines()
    assert lines and all(line.startswith("[faults] ") for line in lines), r.stderr


def test_study_paths_are_relative_to_the_study_file_not_the_current_directory(tmp_path):
    """studies/tinystories_sample.yaml names ../tests/data/...: it works from anywhere."""
    from engine.spec import load_study

    r = collapse("run", REPO / "studies" / "tinystories_sample.yaml", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    study = load_study(REPO / "studies" / "tinystories_sample.yaml")
    assert study.family_params["data"] == str(
        REPO / "tests" / "data" / "tinystories" / "TinyStories-train-head.txt")
    # a --set value is typed in a shell: relative to where collapse runs
    study = load_study(REPO / "studies" / "tinystories_sample.yaml",
                       [f"family.data={os.path.relpath(REPO / 'tests/data/tinystories', Path.cwd())}"])
    assert not os.path.isabs(study.family_params["data"])


def test_work_done_once_is_taken_over_at_once_from_a_killed_maker(tmp_path):
    """A chain killed while it fits or samples the shared generation 1 leaves its lock;
    the resumed run sees that its maker is dead and makes it without waiting for the
    lock to go stale. A live maker is waited for."""
    from engine.files import Location, made_once

    lock = Location.of(tmp_path / "LOCK")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "LOCK").write_text(
        f'{{"host": "{os.uname().nodename}", "pid": {dead.pid}, "started": 0}}')
    made = []
    start = time.time()
    assert made_once(lambda: bool(made), lambda: made.append(1), lock, stale_after=60)
    assert made == [1] and time.time() - start < 10 and not (tmp_path / "LOCK").exists()

    # a live maker (this process) holds it: wait for it, do not make it twice
    import json
    import threading

    import psutil
    (tmp_path / "LOCK").write_text(json.dumps(
        {"host": os.uname().nodename, "pid": os.getpid(),
         "started": psutil.Process().create_time()}))
    done = threading.Timer(2.0, lambda: made.append(2))
    done.start()
    assert not made_once(lambda: len(made) == 2, lambda: made.append(3), lock,
                         stale_after=60, poll=0.1)
    assert made == [1, 2]
