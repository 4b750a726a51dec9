"""From one machine to a cluster: cluster.yaml, study jobs, placement checks, and a real
multi-node Ray cluster (a head and two worker nodes on this machine) that loses a node
in the middle of a generation's training."""
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import TINY_LM, REPO, collapse, collapse_exe, write_study
from engine.corpus import CorpusStore

LINEAR = """\
name: jobtiny
family: {{name: linear, d: 3, T: 20, sigma2: 1.0, trials: 50}}
strategies: [replace, accumulate]
generations: 3
seeds: [0]
out: {out}
"""


# ------------------------------------------------------------------ cluster.yaml

def _cluster_config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it touches the cloud: fill in the provider's defaults,
    # then validate against Ray's autoscaler schema.
    validate_config(prepare_config(copy.deepcopy(_cluster_config())))


def test_rays_validation_would_catch_a_broken_cluster_yaml():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = _cluster_config()
    broken["available_node_types"]["head"]["min_wokers"] = 0  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_yaml_has_gpu_workers_shared_storage_and_a_pinned_install():
    import ray

    config = _cluster_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # the head runs drivers, not training
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 and 1 <= t["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] > 0
    # every node mounts the shared run directories, and the container sees them
    mounts = [c for c in config["initialization_commands"] if "mount" in c and "/mnt/shared" in c]
    assert mounts
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    # the image's Ray is the project's Ray; torch and the GPU extra are pinned
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    setup = " ".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "[vllm]" in setup
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"ray[default,train,tune,data]=={ray.__version__}" in pyproject
    assert 'vllm = ["vllm==0.32.0"]' in pyproject


# ------------------------------------------------------------------ bad input

def test_an_unsupported_out_scheme_is_refused_before_anything_runs(tmp_path):
    study = write_study(tmp_path / "s.yaml", LINEAR.format(out="ftp://host/x"))
    r = collapse("run", study)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"{study}: out: ftp://host/x: unsupported scheme")
    r = collapse("run", study, "--set", "out=hdfs://namenode/run")
    assert r.returncode == 2 and "out (from --set): hdfs://namenode/run: unsupported" in r.stderr
    assert "(supported: a path, file://, s3://, gs://)" in r.stderr


def test_resources_the_cluster_cannot_hold_are_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    study = write_study(tmp_path / "lm.yaml", f"""\
name: toobig
family: {{name: lm, stories: 40, test_stories: 10, vocab_size: 300, model: tiny,
          context: 32, workers: 1, gpus_per_worker: 8}}
strategies: [replace]
generations: 1
seeds: [0]
out: {out}
""")
    r = collapse("run", study, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{study}: family.gpus_per_worker: a trainer worker asks for")
    assert "GPU 8" in last and "no node of this cluster has that" in last
    assert not out.exists()  # nothing was written


def test_submit_to_an_unreachable_address_fails_at_once(tmp_path):
    study = write_study(tmp_path / "s.yaml", LINEAR.format(out=tmp_path / "out"))
    start = time.time()
    r = collapse("submit", study, "--address", "http://127.0.0.1:9", "--working-dir", tmp_path,
                 timeout=120)
    assert r.returncode == 2 and "cannot reach the Ray cluster" in r.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "out").exists()


def test_submit_refuses_a_relative_out(tmp_path):
    study = write_study(tmp_path / "s.yaml", LINEAR.format(out="results/x"))
    r = collapse("submit", study, "--address", "http://127.0.0.1:9", "--working-dir", tmp_path)
    assert r.returncode == 2
    assert f"{study}: out: results/x is a relative path" in r.stderr


# ------------------------------------------------------------------ a study job

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "ray start --head exited: " + log.read_text()[-2000:]
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 where Ray's token authentication is on)
        except Exception:  # noqa: BLE001 — not up yet
            time.sleep(1)
    raise TimeoutError(url)


def _ray_temp_dir() -> str:
    # Ray's session sockets live under its temp dir, and a Unix socket path may not
    # exceed 107 bytes: pytest's tmp_path is too deep for that.
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


def _kill_ray_started_in(temp_dir: str) -> None:
    """Kill every process of the Ray whose session lives in temp_dir (and only those)."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                p.kill()
        except psutil.Error:
            pass
    if not os.environ.get("KEEP_RAY_LOGS"):
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.heavy  # (~40 s here: a Ray head of its own plus a job; make test-heavy)
def test_collapse_submit_runs_a_study_as_a_ray_job(tmp_path):
    # A real Ray head with its job server on loopback, started the way `ray up` does.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    dashboard = _free_port()
    temp_dir = _ray_temp_dir()
    head_log = tmp_path / "head.log"
    head = subprocess.Popen(
        [str(Path(bin_dir) / "ray"), "start", "--head", "--block", f"--port={_free_port()}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}"],
        env=env, start_new_session=True, stdout=open(head_log, "w"), stderr=subprocess.STDOUT)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_http(f"{address}/api/version", head, head_log)
        # the working directory the job uploads: the engine and the study
        project = tmp_path / "project"
        shutil.copytree(REPO / "engine", project / "engine",
                        ignore=shutil.ignore_patterns("__pycache__"))
        out = tmp_path / "shared" / "jobtiny"
        study = write_study(project / "study.yaml", LINEAR.format(out="results/jobtiny"))
        r = collapse("submit", study, "--address", address, "--working-dir", project,
                     "--set", f"out={out}", cwd=project, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        job_id = r.stdout.split("submitted job ", 1)[1].split(":", 1)[0]
        assert f"job {job_id}: SUCCEEDED" in r.stdout
        assert "[jobtiny] 6/6 generations" in r.stdout  # the job's log, followed
        table = pd.read_parquet(out / "results.parquet")
        cells = table[table.metric == "test_error"].groupby(["strategy", "generation"]).size()
        assert cells.to_dict() == {(s, g): 1 for s in ("accumulate", "replace") for g in (1, 2, 3)}
        r = collapse("status", "--address", address)
        assert r.returncode == 0 and job_id in r.stdout and "SUCCEEDED" in r.stdout
        assert "jobtiny" in r.stdout
        r = collapse("logs", job_id, "--address", address)
        assert r.returncode == 0 and "results:" in r.stdout
        r = collapse("stop", job_id, "--address", address)
        assert r.returncode == 0 and "already finished" in r.stdout
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
        _kill_ray_started_in(temp_dir)


# ------------------------------------------------------------------ losing a node

ELASTIC = """\
name: elastic
family:
""" + TINY_LM + """\
  stories: 420
  test_stories: 60
  workers: 2
  min_workers: 1          # elastic: go on with one worker when a node is lost
  cpus_per_worker: 0.5
  worker_resources: {{trainer: 1}}   # one trainer worker per worker node
  checkpoint_minutes: 0.0001   # every CHECK_STEPS (5) steps
  max_failures: 3
  sampler: hf
  sampler_cpus: 0.5
  threads: 1
strategies: [accumulate]
generations: 1            # the node is lost in generation 1's training
seeds: [0]
out: {out}
resources: {{cpus_per_trial: 0.25}}
"""


def _processes_of(node) -> list[str]:
    """Command lines (Ray sets them to the actor or task name) of a node's workers."""
    import psutil
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    lines = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            lines.append(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    return lines


@pytest.mark.slow
@pytest.mark.heavy
def test_a_study_survives_losing_a_worker_node_mid_training(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # After a failure Ray Train first asks again for the group it had and waits this
    # long (default 60 s) before it settles for the workers it can place. Every Ray
    # process of this cluster inherits the setting from here.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    temp_dir = _ray_temp_dir()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "temp_dir": temp_dir})
    workers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    study = write_study(tmp_path / "elastic.yaml", ELASTIC.format(out=out))
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        run = subprocess.Popen([collapse_exe(), "run", str(study), "--address", cluster.address],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    chain = out / "trials" / "accumulate__seed=0"
    try:
        # Wait until Ray Train has registered a checkpoint of generation 1's training,
        # then kill a worker node that holds a training worker (not the one running the
        # chain's driver).
        snapshot = chain / "scratch" / "gen-0001" / "ray_train" / "fit" / \
            "checkpoint_manager_snapshot.json"
        deadline = time.time() + 400
        while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
            assert run.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "no training checkpoint appeared"
            time.sleep(0.05)
        assert not (chain / "models" / "gen-0001").exists()  # still mid-training
        victims = [n for n in workers
                   if any("RayTrainWorker" in c for c in _processes_of(n))
                   and not any("TrainController" in c or "_run_chain_task" in c
                               for c in _processes_of(n))]
        assert victims, "no worker node holds a training worker"
        cluster.remove_node(victims[0], allow_graceful=False)
        assert run.wait(600) == 0, log_path.read_text()[-3000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        cluster.shutdown()
        _kill_ray_started_in(temp_dir)

    table = pd.read_parquet(out / "results.parquet")
    per_gen = table[table.step.isna()]
    assert not per_gen.duplicated(["trial", "generation", "metric"]).any()
    assert sorted(per_gen[per_gen.metric == "test_loss"].generation) == [1]
    store = CorpusStore(chain / "corpus")
    assert store.verify() == []
    assert {k: e.rows for k, e in store.entries().items()} == {
        "real-0001": 360}  # the last generation samples nothing (sample_last: false)
    chain_log = (chain / "chain.log").read_text()
    assert "training resumed from its checkpoint at step" in chain_log, chain_log[-3000:]
    assert "finished with 1 worker(s)" in chain_log
    record = json.loads((chain / "models" / "gen-0001" / "fit.json").read_text())
    assert record["world_size"] == 1 and record["resumed_at_step"] % 5 == 0
    assert 0 < record["resumed_at_step"] < record["steps"]


def test_on_a_cluster_a_chain_no_node_can_hold_is_refused_with_the_largest_node(tmp_path,
                                                                               monkeypatch):
    from engine import cluster
    from engine.errors import SpecError
    from engine.spec import load_study

    study = load_study(write_study(tmp_path / "s.yaml", LINEAR.format(out=tmp_path / "out")
                                   + "resources: {memory_per_trial: 4TiB}\n"))
    monkeypatch.setattr(cluster, "node_shapes",
                        lambda: [{"CPU": 16.0, "memory": 64.0 * 2**30}])
    with pytest.raises(SpecError, match=r"resources.memory_per_trial: a chain's driver needs "
                       r"4096.0 GiB of memory \(resources.memory_per_trial\), but the largest "
                       r"node offers 64.0 GiB"):
        cluster.check_fits_cluster(study)
    monkeypatch.setattr(cluster, "node_shapes", lambda: [{"CPU": 16.0}])  # autoscaled: unknown
    cluster.check_fits_cluster(study)


def test_chains_declare_their_memory_and_a_study_no_node_can_hold_is_refused(tmp_path):
    from engine.families import family_for
    from engine.spec import load_study

    out = tmp_path / "out"
    study = write_study(tmp_path / "s.yaml", LINEAR.format(out=out)
                        + "resources: {memory_per_trial: 4TiB}\n")
    r = collapse("run", study, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    # refused before Ray starts: a local run knows this machine's memory
    assert last.startswith(f"{study}: chain replace__seed=0 needs ~4,096 GiB of memory (the "
                           "family's estimate, or resources.memory_per_trial); this machine has "), last
    assert last.endswith("make the study smaller, or run it on a cluster (--address)"), last
    assert not out.exists()
    bad = write_study(tmp_path / "b.yaml", LINEAR.format(out=out)
                      + "resources: {memory_per_trial: lots}\n")
    r = collapse("run", bad)
    assert r.returncode == 2 and "resources.memory_per_trial: expected an amount of memory" \
        in r.stderr
    # a family's own estimate: the LM's grows with its model
    small, big = (family_for(load_study(REPO / "studies" / "tinystories_paper.yaml",
                                        [f"family.model={m}"]).trials()[0]).chain_memory()
                  for m in ("gpt2-9m", "llama2-126m"))
    assert (1 << 30) < small < big
