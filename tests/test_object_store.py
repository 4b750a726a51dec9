"""A run directory in an object store: `out: s3://bucket/run`.

A real S3 API (moto's server, on loopback) stands in for AWS; the engine reaches it the
way it reaches AWS, through pyarrow's S3 filesystem with the endpoint from
AWS_ENDPOINT_URL, which every process of the run (chain drivers, Ray Data readers, Ray
Train workers, sampler actors) inherits."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_LM, collapse, write_study
from engine import strategies as S
from engine.corpus import CorpusStore

LINEAR = """\
name: s3linear
family: {{name: linear, d: 3, T: 20, sigma2: 1.0, trials: 50}}
strategies: [replace, accumulate]
generations: 3
seeds: [0]
out: {out}
"""

LM = """\
name: s3lm
family:
""" + TINY_LM + """\
  stories: 200
  test_stories: 40
  checkpoint_minutes: 0.0001   # every 5 steps
  repetition_penalty: 1.3      # passed to vLLM's sampling parameters
strategies: [accumulate]
generations: 1
sample_last: true      # the vLLM path inside a chain, through the bucket
seeds: [0]
out: {out}
resources: {{cpus_per_trial: 0.25}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with one bucket; AWS_* variables point this process and every
    process it starts at it. Yields the bucket's URI."""
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                               "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "moto_server did not start"
                time.sleep(0.2)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"],
                          allow_bucket_creation=True).create_dir("runs")
        yield "s3://runs"
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _objects(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    return sorted(i.path[len(path) + 1:] for i in
                  fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if i.type == pafs.FileType.File)


@pytest.mark.heavy  # (~1 min; make test-heavy, CI runs it)
def test_a_study_runs_with_its_run_directory_in_a_bucket(s3, tmp_path):
    out = f"{s3}/linear"
    study = write_study(tmp_path / "s.yaml", LINEAR.format(out=out))
    r = collapse("run", study)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"results: {out}/results.parquet" in r.stdout
    # Same numbers as the same study run on a local disk.
    local = write_study(tmp_path / "l.yaml", LINEAR.format(out=tmp_path / "local"))
    assert collapse("run", local).returncode == 0
    in_bucket = collapse("table", out)
    assert in_bucket.returncode == 0, in_bucket.stderr
    assert in_bucket.stdout == collapse("table", tmp_path / "local").stdout
    # Everything of the run is in the bucket, nothing half-written: chains, corpora with
    # verified checksums, models (with their completion marker), results.
    objects = _objects(out)
    for chain in ("replace__seed=0", "accumulate__seed=0"):
        assert f"trials/{chain}/metrics/gen-0003.json" in objects
        assert f"trials/{chain}/models/gen-0003/COMPLETE" in objects
        assert f"trials/{chain}/chain.log" in objects
        store = CorpusStore(f"{out}/trials/{chain}/corpus")
        # the last generation samples nothing (sample_last: false)
        assert set(store.entries()) == {"real-0001", "synthetic-0001", "synthetic-0002"}
        assert store.verify() == []
    assert {"results.parquet", "results.csv", "study.yaml"} <= set(objects)
    assert not [o for o in objects if "/.tmp-" in o or o.startswith(".tmp-")]
    # Plots go into the bucket too.
    r = collapse("plot", out)
    assert r.returncode == 0, r.stderr
    assert "plots/test_error.png" in _objects(out)
    # A second run finds the work done.
    r = collapse("run", study)
    assert r.returncode == 0 and "already complete" in r.stderr


def test_a_bucket_that_does_not_exist_is_refused_in_one_line(s3, tmp_path):
    study = write_study(tmp_path / "s.yaml", LINEAR.format(out="s3://no-such-bucket/run"))
    r = collapse("run", study)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{study}: out: s3://no-such-bucket/run: cannot write there"), r.stderr


@pytest.mark.slow
@pytest.mark.heavy
def test_a_language_model_study_trains_and_samples_through_a_bucket(s3, tmp_path):
    """Ray Data streams the mix from the bucket, Ray Train keeps its checkpoints there
    and hands the model back through it, the sampler actors load the model from it."""
    out = f"{s3}/lm"
    study = write_study(tmp_path / "lm.yaml", LM.format(out=out))
    r = collapse("run", study)
    assert r.returncode == 0, r.stderr[-3000:]
    table = pd.read_parquet(f"{out}/results.parquet")
    losses = table[(table.metric == "test_loss") & table.step.isna()]
    assert sorted(losses.generation) == [1]
    chain = f"{out}/trials/accumulate__seed=0"
    store = CorpusStore(f"{chain}/corpus")
    assert {k: e.rows for k, e in store.entries().items()} == {"real-0001": 160,
                                                               "synthetic-0001": 160}
    assert store.verify() == []
    objects = _objects(chain)
    assert "models/gen-0001/COMPLETE" in objects and "models/gen-0001/model.safetensors" in objects
    assert not [o for o in objects if o.startswith("scratch/")]  # fits cleared their scratch
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(f"{chain}/chain.log")
    with fs.open_input_stream(path) as f:
        log = f.read().decode()
    assert "generation 1/1 done" in log
    # the sampler that ran (vLLM where installed: Ray's LLM processor downloads the
    # model from the bucket onto the node of each engine)
    from engine.families.lm.sampling import vllm_available

    assert store.entry(S.synthetic(1)).metadata == {"sampler": "vllm" if vllm_available()
                                                    else "hf"}
