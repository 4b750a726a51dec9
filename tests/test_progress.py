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
