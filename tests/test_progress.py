"""Progress of long work: what fits and samplers write, what the chain reads, logs and
hands to Tune (engine/progress.py). The end-to-end check is in test_lm_chain.py."""
import json
import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import progress
from engine.corpus import rows_written
from engine.files import Location


def test_watching_logs_rate_and_eta_and_records_them(tmp_path, caplog):
    """A phase of 100 steps read as 10 more every look: the first line has no rate yet,
    later lines a rate and the time left at it, and the record holds the last look."""
    seen = iter(range(10, 1000, 10))
    record = Location.of(tmp_path / "progress.json")
    caplog.set_level(logging.INFO, logger="engine.progress")
    with progress.watching("replace__seed=0", 3, "fit", "steps",
                           lambda: (next(seen), 100), record, every=0.05):
        deadline = time.time() + 10
        while (progress.read_progress(record) is None
               or progress.read_progress(record).done < 100) and time.time() < deadline:
            time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("replace__seed=0: generation 3: fit 10/100 steps (10%) after ")
    assert "/s" not in lines[0]  # one look measures no rate
    assert any(" steps/s, ~" in line and line.endswith(" s left") for line in lines[1:]), lines
    last = progress.read_progress(record)
    assert (last.generation, last.phase, last.done, last.total) == (3, "fit", 100, 100)
    assert last.per_second > 0 and last.eta_seconds == 0
    assert lines[-1].startswith("replace__seed=0: generation 3: fit 100/100 steps (100%)")


def test_a_failing_read_is_skipped_not_fatal(tmp_path):
    def broken():
        raise OSError("bucket unreachable")

    with progress.watching("c", 1, "sampling", "stories", broken,
                           Location.of(tmp_path / "p.json"), every=0.01):
        time.sleep(0.1)
    assert not (tmp_path / "p.json").exists()


def test_fit_and_sampler_writers_and_their_readers(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)
    fit_file = Location.of(tmp_path / "scratch" / "progress.json")
    assert progress.fit_steps(fit_file) == (0, 0)  # nothing written yet
    step = progress.StepProgress(fit_file.uri, 400)
    step(120)
    assert progress.fit_steps(fit_file) == (120, 400)
    progress.StepProgress(None, 400)(130)  # other ranks write nothing
    assert progress.fit_steps(fit_file) == (120, 400)

    counts = Location.of(tmp_path / "sampling")
    actors = [progress.RowsProgress(counts.uri), progress.RowsProgress(counts.uri)]
    actors[0].add(100)
    actors[1].add(60)
    actors[0].add(100)
    assert progress.rows_sampled(counts) == 260
    assert len(counts.children()) == 2  # one file per actor
    (tmp_path / "sampling" / "torn.json").write_text('{"do')  # a write in flight
    assert progress.rows_sampled(counts) == 260


def test_rows_written_counts_finished_parquet_files_only(tmp_path):
    for i, n in enumerate((20, 35)):
        pq.write_table(pa.table({"x": list(range(n))}), tmp_path / f"{i}.parquet")
    (tmp_path / "2.parquet").write_bytes(b"PAR1 half a file")  # still being written
    assert rows_written(Location.of(tmp_path)) == 55
    assert rows_written(Location.of(tmp_path / "absent")) == 0


@pytest.mark.parametrize("done,total,expected", [(0, 10, "0/10 stories (0%)")])
def test_progress_line_before_any_rate(done, total, expected):
    p = progress.Progress(2, "sampling", done, total, "stories", None, None, 3.0)
    assert p.line() == f"generation 2: sampling {expected} after 3 s"
    assert json.loads(json.dumps(p.__dict__))["unit"] == "stories"


def test_the_study_progress_counts_each_chain_once_and_a_finished_chain_whole(tmp_path):
    """The study's progress lines (engine/sweep.py): a chain's count is the highest
    generation it reported, so a generation another chain wrote to disk first is not
    counted early; a chain whose last report was lost (written just before a restart,
    not reported again) counts whole when it finishes; one that stopped on an error
    does not."""
    from types import SimpleNamespace

    from conftest import write_study
    from engine.spec import load_study
    from engine.sweep import FAILED, _progress_callback

    study = load_study(write_study(tmp_path / "s.yaml", f"""name: p
family: {{name: linear, d: 3, T: 20, trials: 10}}
strategies: [replace, accumulate, replace_multiple]
generations: 3
seeds: [0]
out: {tmp_path / 'out'}
"""))
    lines = []
    progress = _progress_callback(study, tmp_path / "out", 0, 9, lines.append)
    chains = {t.strategy: SimpleNamespace(config={"trial": t.to_dict()}, last_result={})
              for t in study.trials()}

    def report(strategy, g):
        progress.on_trial_result(0, [], chains[strategy], {"generation": g, "test_error": 1.0})

    for g in (1, 2, 3):
        report("replace", g)
    report("accumulate", 1)
    report("accumulate", 2)  # its generation 3 is on disk, its report lost
    assert lines[-1].startswith("[p] 5/9 generations (") and "left)" in lines[-1]
    progress.on_trial_complete(0, [], chains["accumulate"])
    assert lines[-1].startswith("[p] 6/9 generations (") and \
        lines[-1].endswith("accumulate__seed=0  all generations")
    progress.on_trial_complete(0, [], chains["replace"])  # nothing new: no line
    assert len(lines) == 6
    report("replace_multiple", 1)
    chains["replace_multiple"].last_result = {FAILED: "bad data"}
    progress.on_trial_complete(0, [], chains["replace_multiple"])
    assert len(lines) == 7 and lines[-1].startswith("[p] 7/9 generations")
