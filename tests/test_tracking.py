"""Experiment tracking through Ray's own callbacks, read back from a real MLflow file
store and real W&B offline run files (no mocks)."""
import json
import os
from pathlib import Path

import pytest

from conftest import collapse, write_study

STUDY = """\
name: tracked
family: {{name: linear, d: [3, 4], T: 20, sigma2: 1.0, trials: 40}}
strategies: [replace, accumulate]
generations: 3
seeds: [0]
out: {out}
tracking: {{mlflow: "file://{mlruns}", wandb: collapse-test}}
"""


def wandb_records(path: Path):
    """The records of a W&B run file (.wandb): a 7-byte header, then LevelDB-log
    records (4-byte checksum, 2-byte length, 1-byte type) in 32 KiB blocks, each
    holding a protobuf `Record`, split FIRST/MIDDLE/LAST across blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B writes one or the other


@pytest.mark.slow
@pytest.mark.heavy  # (~1 min; make test-heavy, CI runs it)
def test_mlflow_and_wandb_hold_a_run_per_chain_with_its_generations(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, mlruns = tmp_path / "out", tmp_path / "mlruns"
    study = write_study(tmp_path / "s.yaml", STUDY.format(out=out, mlruns=mlruns))
    r = collapse("run", study)
    assert r.returncode == 0, r.stderr[-3000:]

    # MLflow: an experiment named by the study, a run per chain
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = mlflow.MlflowClient(f"file://{mlruns}")
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    by_chain = {run.info.run_name: run for run in runs}
    runs_before = runs
    assert set(by_chain) == {"replace__d=3__seed=0", "replace__d=4__seed=0",
                             "accumulate__d=3__seed=0", "accumulate__d=4__seed=0"}
    import engine

    table = engine.load_results(out)
    for chain, run in by_chain.items():
        tags = run.data.tags
        assert (tags["study"], tags["chain"], tags["strategy"], tags["seed"]) == \
            ("tracked", chain, chain.split("__")[0], "0")
        assert tags["axis.d"] == chain.split("__")[1].split("=")[1]
        assert run.data.params["T"] == "20" and run.data.params["strategy"] == tags["strategy"]
        history = client.get_metric_history(run.info.run_id, "test_error")
        expected = table[(table.trial == chain) & (table.metric == "test_error")] \
            .sort_values("generation")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == \
            pytest.approx(expected.value.tolist())
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == \
            {"study.yaml", "results.parquet"}

    # W&B, offline: the run files under out/tracking/wandb, read back record by record
    runs = {}
    for f in (out / "tracking" / "wandb").glob("offline-run-*/run-*.wandb"):
        run, history, config, artifacts = None, [], {}, []
        for record in wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                config.update({_key(i): json.loads(i.value_json) for i in run.config.update})
            elif kind == "history":
                history.append({_key(i): json.loads(i.value_json)
                                for i in record.history.item})
            elif kind == "artifact":
                artifacts += [m.path for m in record.artifact.manifest.contents]
        runs[run.display_name] = (run, history, config, artifacts)
    assert set(runs) == set(by_chain) | {"tracked results"}
    for chain in by_chain:
        run, history, config, _ = runs[chain]
        assert run.run_group == "tracked" and list(run.tags) == ["tracked", chain.split("__")[0]]
        assert config["strategy"] == chain.split("__")[0] and config["T"] == 20
        expected = table[(table.trial == chain) & (table.metric == "test_error")] \
            .sort_values("generation")
        assert [h["_step"] for h in history] == [1, 2, 3]
        assert [h["test_error"] for h in history] == pytest.approx(expected.value.tolist())
    assert sorted(runs["tracked results"][3]) == ["results.parquet", "study.yaml"]

    # one more generation in a later run: every chain's MLflow run goes on, no new one
    r = collapse("run", study, "--set", "generations=4")
    assert r.returncode == 0, r.stderr[-3000:]
    again = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert {run.info.run_id for run in again} == {run.info.run_id for run in runs_before}
    for run in again:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_error"))
        assert steps == [1, 2, 3, 4], (run.info.run_name, steps)


def test_tracking_is_checked_before_anything_runs(tmp_path, monkeypatch):
    """A tracker whose package is missing, an unknown tracker, a store that cannot be
    opened: one line naming the field, exit 2, nothing written."""
    from engine import tracking

    out = tmp_path / "out"
    study = write_study(tmp_path / "s.yaml", STUDY.format(out=out, mlruns=tmp_path / "m"))
    r = collapse("run", study, "--set", "tracking.neptune=x")
    assert r.returncode == 2 and "tracking.neptune (from --set): unknown tracker" in r.stderr
    r = collapse("run", study, "--set", "tracking.mlflow=ftp://nowhere/mlruns",
                 "--set", "tracking.wandb=null")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "tracking.mlflow: cannot open ftp://nowhere/mlruns" in r.stderr
    assert not out.exists()
    # without the package: which extra to install
    from engine.spec import SpecError, load_study

    monkeypatch.setitem(tracking.NEEDS, "mlflow", "mlflow_is_not_installed_here")
    with pytest.raises(SpecError, match=r"tracking\.mlflow: needs the "
                       r"mlflow_is_not_installed_here package, which is not installed: "
                       r"pip install -e '\.\[tracking\]'"):
        load_study(study)


def test_a_generations_fit_curves_reach_the_trackers_from_its_metrics_record(tmp_path):
    """What both trackers log beside a generation's metrics: its fit's per-step curves,
    read from the chain's metrics record ({} where there is none or it is damaged)."""
    from types import SimpleNamespace

    from engine.chain import chain_layout
    from engine.records import write_record
    from engine.spec import load_study
    from engine.tracking import _curves

    study = load_study(write_study(tmp_path / "s.yaml", STUDY.format(
        out=tmp_path / "out", mlruns=tmp_path / "mlruns").replace(
        'tracking: {mlflow: "file://' + str(tmp_path / "mlruns") + '", wandb: collapse-test}\n',
        "")))
    chain = study.trials()[0]
    trial = SimpleNamespace(config={"trial": chain.to_dict(), "out": str(tmp_path / "out")})
    paths = chain_layout(tmp_path / "out", chain)
    curve = [[10, 2.5], [20, 2.0]]
    for g in (1, 2):
        write_record(paths.metrics(g), {"generation": g, "metrics": {"test_error": 1.0},
                                        "curves": {"train_loss": curve} if g == 2 else {}})
    assert _curves(trial, {"generation": 2}) == {"train_loss": curve}
    assert _curves(trial, {"generation": 1}) == {}
    assert _curves(trial, {"generation": 3}) == {}  # not on disk
    paths.metrics(2).local_path.write_text("{damaged")
    assert _curves(trial, {"generation": 2}) == {}
