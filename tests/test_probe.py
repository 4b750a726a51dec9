"""What a hostile but realistic user does to a run (issue 24): damaged files a later
step trusts, odd study files, a second run into a live run's out, an out that is not
a run. Each is caught and named, and what can be recomputed is."""
import json
import os

import pandas as pd
import pytest

from conftest import collapse, write_study

STUDY = """\
name: probe
family: {{name: linear, d: 5, T: 50, trials: 20}}
strategies: [replace, accumulate]
generations: 3
seeds: [0]
out: {out}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The probe's study S, run once; its table as the reference."""
    d = tmp_path_factory.mktemp("probe")
    out = d / "out"
    study = write_study(d / "s.yaml", STUDY.format(out=out))
    r = collapse("run", study)
    assert r.returncode == 0, r.stderr
    return study, out, pd.read_parquet(out / "results.parquet")


def same_table(out, reference):
    table = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(table.sort_values(list(table.columns)).reset_index(drop=True),
                                  reference.sort_values(list(reference.columns))
                                  .reset_index(drop=True))


def rerun_in_process(study_file, reference) -> None:
    """`collapse run` again, through run_chain (the code Tune runs) in this process: every
    chain resumed, and the table collected from the chains' metrics equal to the
    reference's."""
    from engine import results
    from engine.chain import run_chain
    from engine.spec import load_study

    study = load_study(study_file)
    for trial in study.trials():
        run_chain(trial, trial.generations, study.out)
    columns = ["trial", "generation", "metric", "value"]
    pd.testing.assert_frame_equal(
        results.collect(study)[columns].sort_values(columns).reset_index(drop=True),
        reference[columns].sort_values(columns).reset_index(drop=True), check_dtype=False)


@pytest.mark.slow
def test_an_edited_metric_is_named_and_recomputed(run):
    study, out, reference = run
    metrics = out / "trials" / "replace__seed=0" / "metrics" / "gen-0002.json"
    record = json.loads(metrics.read_text())
    record["metrics"]["test_error"] = 0.001  # a number edited by hand
    metrics.write_text(json.dumps(record))
    rerun_in_process(study, reference)
    log = (out / "trials" / "replace__seed=0" / "chain.log").read_text()
    assert f"{metrics}: checksum mismatch" in log and "generation 2 is recomputed" in log


@pytest.mark.slow
def test_a_flipped_byte_of_a_model_is_named_and_the_model_fit_again(run):
    study, out, reference = run
    chain = out / "trials" / "accumulate__seed=0"
    model = next((chain / "models" / "gen-0003").glob("*.npy"))
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x10
    model.write_bytes(bytes(data))
    (chain / "metrics" / "gen-0003.json").unlink()
    rerun_in_process(study, reference)
    assert f"{model}: checksum mismatch" in (chain / "chain.log").read_text()


@pytest.mark.slow
def test_a_flipped_bit_of_the_table_is_named_and_the_table_rebuilt(run):
    study, out, reference = run
    table = out / "results.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0x01
    table.write_bytes(bytes(data))
    r = collapse("table", out, "--metric", "test_error", "--pivot")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == (f"{table}: checksum mismatch (the file changed after it was "
                                "written); rebuilt from the chains' metrics")
    same_table(out, reference)


@pytest.mark.slow
def test_a_damaged_record_of_past_runs_is_named_before_ray_starts(run, tmp_path):
    import shutil

    study, out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "runs.json").write_text("[1, 2]")
    r = collapse("run", study, "--set", f"out={copy}")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"{copy / 'runs.json'}: unreadable (not a list of runs); "
                                "delete it (it only records past runs)")


def test_a_second_run_into_a_live_runs_out_is_refused_naming_it(tmp_path):
    import psutil

    out = tmp_path / "out"
    out.mkdir()
    (out / ".collapse-run").touch()
    me = psutil.Process()
    lock = {"host": os.uname().nodename, "pid": me.pid, "started": me.create_time(),
            "command": "collapse run s.yaml"}
    (out / "RUN.lock").write_text(json.dumps(lock))
    study = write_study(tmp_path / "s.yaml", STUDY.format(out=out))
    r = collapse("run", study)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"out: {out} is in use by another collapse run (host "
                                f"{lock['host']}, pid {me.pid}: collapse run s.yaml); wait "
                                "for it to end, or stop it")
    # its maker dead (this pid, but another process start): the lock is taken over
    (out / "RUN.lock").write_text(json.dumps({**lock, "started": lock["started"] - 1000}))
    r = collapse("run", study, "--set", "generations=1", "--set", "strategies=[replace]")
    assert r.returncode == 0, r.stderr
    assert not (out / "RUN.lock").exists()


def test_an_out_holding_a_users_files_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "study.yaml").write_text("my own notes")
    (out / "report.html").write_text("<p>mine</p>")
    study = write_study(tmp_path / "s.yaml", STUDY.format(out=out))
    r = collapse("run", study)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"{study}: out: {out} exists and holds files this engine did "
                                "not write (report.html, study.yaml); choose another out "
                                "(--set out=DIR), or empty it")
    assert (out / "study.yaml").read_text() == "my own notes"


@pytest.mark.parametrize("text,message", [
    ("name: s\ngenerations: 3\nfamily: {name: linear}\nstrategies: [replace]\nseeds: [0]\n"
     "generations: 2\n", "not valid YAML at line 6: 'generations' is given twice, at lines 2 "
                         "and 6: keep one"),
    ("name: s\ngenerations: 1\nfamily: {name: linear, sigma2: .nan}\nstrategies: [replace]\n"
     "seeds: [0]\n", "family.sigma2: must be a finite number, got nan"),
    ("name: s\ngenerations: 1\nfamily: {name: linear, ridge: -.inf}\nstrategies: [replace]\n"
     "seeds: [0]\n", "family.ridge: must be a finite number, got -inf"),
])
def test_odd_study_files_are_one_line(tmp_path, text, message):
    study = write_study(tmp_path / "s.yaml", text + f"out: {tmp_path / 'out'}\n")
    r = collapse("run", study)
    assert r.returncode == 2 and r.stderr.strip() == f"{study}: {message}", r.stderr
    assert not (tmp_path / "out").exists()


def test_an_alias_bomb_and_a_file_that_is_not_text_are_one_short_line(tmp_path):
    lists = ", ".join(["&a [1,1,1,1,1,1,1,1,1,1]"] + [
        f"&{b} [{', '.join(['*' + a] * 10)}]" for a, b in zip("abcd", "bcde")] +
        [f"[{', '.join(['*e'] * 10)}]"])
    bomb = write_study(tmp_path / "bomb.yaml", "name: bomb\ngenerations: 1\nseeds: [0]\n"
                       f"strategies: [replace]\nfamily:\n  name: linear\n  d: [{lists}]\n")
    r = collapse("run", bomb)
    assert r.returncode == 2 and len(r.stderr) < 400, r.stderr[:400]
    assert r.stderr.startswith(f"{bomb}: family.d[0]: expected an integer, got [1, 1, 1")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: s\xff\n")
    r = collapse("run", binary)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"{binary}: not UTF-8 text (byte 7: invalid start byte); save the study file as UTF-8")


def test_a_live_writers_temporary_folder_is_left_alone(tmp_path):
    """write_streamed removes a killed attempt's temporary folder, never a live one's
    (two runs into one out are refused; a chain's own retries are one writer at a time)."""
    import pyarrow as pa
    import psutil

    from engine import strategies as S
    from engine.corpus import MAKER, CorpusStore

    store = CorpusStore(tmp_path / "corpus")
    store.write(S.real(1), pa.table({"v": [1, 2]}), model="real data")
    me = psutil.Process()
    live, dead = (tmp_path / "corpus" / f".tmp-{k}-synthetic-0001" for k in ("aaaa", "bbbb"))
    for folder, started in ((live, me.create_time()), (dead, me.create_time() - 1000)):
        folder.mkdir()
        (folder / MAKER).write_text(json.dumps({"host": os.uname().nodename, "pid": me.pid,
                                                "started": started}))
    store.write(S.synthetic(1), pa.table({"v": [3, 4]}), model="g1")
    assert live.exists() and not dead.exists()


def write_jsonl(path, bad_record):
    with open(path, "w") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"Once upon a time there was a cat number {i}."}) + "\n")
        f.write(bad_record + "\n")
    return path


@pytest.mark.parametrize("record,message", [
    ('{"text": 123}', "line 51: `text` is int (123), not a string"),
    ('{"text": ["a", "b"]}', "line 51: `text` is list (['a', 'b']), not a string"),
    ('{"text": "cut short', "line 51: not valid JSON (Unterminated string starting at)"),
    ('{"story": "no text"}', "line 51: no `text` field (every record needs one)"),
])
def test_text_data_that_is_not_text_is_one_line_naming_the_record(tmp_path, record, message):
    data = write_jsonl(tmp_path / "stories.jsonl", record)
    study = write_study(tmp_path / "s.yaml", f"""\
name: t
family: {{name: lm, data: {data}, test_stories: 5, vocab_size: 300, model: tiny}}
strategies: [replace]
generations: 1
seeds: [0]
out: {tmp_path / 'out'}
""")
    for extra in ((), ("--dry-run",)):
        r = collapse("run", study, *extra)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == f"{study}: family.data: {data}: {message}"
    assert not (tmp_path / "out").exists()


def test_a_record_that_is_not_text_found_while_preparing_is_one_line(tmp_path, ray_local):
    """Data the checks before the run do not read (a URI) is found by the preparation's
    Ray tasks: the same one line, raised as itself, and nothing left behind."""
    from engine.families import get_family
    from engine.families.lm.data import DataError
    from engine.files import Location

    data = write_jsonl(tmp_path / "stories.jsonl", '{"text": 7}')
    family = get_family("lm").from_params({"data": f"file://{data}", "test_stories": 5,
                                           "vocab_size": 300, "model": "tiny"})
    with pytest.raises(DataError) as e:
        family.prepare(0, Location(str(tmp_path / "real")))
    assert str(e.value) == f"{data}: line 51: `text` is int (7), not a string"
    assert not any((tmp_path / "real").glob("lm-*"))


def test_a_job_takes_the_package_and_the_study_never_secrets(tmp_path):
    """`collapse submit` packs what the job needs (engine/, studies/, pyproject.toml,
    the files the study names) and nothing else: no .env, keys, credentials, tokens."""
    import shutil

    from conftest import REPO
    from engine.jobs import pack
    from engine.spec import load_study

    root = tmp_path / "project"
    shutil.copytree(REPO / "engine", root / "engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "studies").mkdir()
    (root / "pyproject.toml").write_text("[project]\n")
    (root / "data").mkdir()
    (root / "data" / "stories.txt").write_text("Once upon a time.\n<|endoftext|>\n" * 30)
    (root / "data" / "other.txt").write_text("not named by the study")
    secrets = [".env", "deploy.pem", ".aws/credentials", ".ssh/id_rsa", ".netrc",
               "hf_token.txt", "data/.env", "studies/api_secret.yaml"]
    for s in secrets:
        (root / s).parent.mkdir(parents=True, exist_ok=True)
        (root / s).write_text("SECRET")
    study = root / "studies" / "s.yaml"
    study.write_text("name: s\nfamily: {name: lm, data: ../data/stories.txt, test_stories: "
                     "5}\nstrategies: [replace]\ngenerations: 1\nseeds: [0]\nout: /mnt/x\n")
    staging, packed = pack(root, study, load_study(study))
    names = {p for p, _ in packed}
    assert {"studies/s.yaml", "pyproject.toml", "data/stories.txt",
            "engine/chain.py"} <= names
    assert not names & set(secrets) and "data/other.txt" not in names
    assert not [p for p in staging.rglob("*") if p.is_file() and p.read_text(
        errors="ignore") == "SECRET"]


@pytest.mark.slow
def test_a_local_run_listens_on_the_loopback_address_only(tmp_path):
    """The Ray a `collapse run` starts for itself exports no metrics and listens on
    127.0.0.1 only: the autoscaler's and dashboard's Prometheus endpoints (no
    authentication) and Ray's own services are this machine's alone."""
    import subprocess
    import sys
    import textwrap

    from conftest import REPO

    script = textwrap.dedent("""
        import ipaddress, time, urllib.request, psutil, ray
        from engine.cluster import ray_connection
        before = {c.laddr.port for c in psutil.net_connections("inet") if c.status == "LISTEN"}
        with ray_connection(None):
            ray.get(ray.remote(lambda: 1).remote())
            time.sleep(5)
            listening, exported = [], 0
            for c in psutil.net_connections("inet"):
                if c.status != "LISTEN" or c.laddr.port in before:
                    continue
                ip = ipaddress.ip_address(c.laddr.ip)
                ip = getattr(ip, "ipv4_mapped", None) or ip
                listening.append((str(ip), c.laddr.port, ip.is_loopback))
                try:
                    body = urllib.request.urlopen(
                        f"http://127.0.0.1:{c.laddr.port}/metrics", timeout=2).read(300)
                    exported += b"# TYPE" in body
                except Exception:
                    pass
        print("not loopback:", [l for l in listening if not l[2]], "of", len(listening))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("not loopback: [] of ") and int(line.split()[-1]) > 3, line


@pytest.mark.slow
def test_a_report_or_plot_that_cannot_be_written_is_one_line(run, tmp_path):
    _, out, _ = run
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where a directory would go")
    r = collapse("report", out, "--out", blocked / "report.html")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"{blocked / 'report.html'}: cannot be written (a file stands where a directory "
        "would go)"), r.stderr
    r = collapse("plot", out, "--out", blocked / "plots")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"{blocked / 'plots' / 'test_error.png'}: cannot be written (a file stands where a "
        "directory would go)"), r.stderr


def test_a_hub_model_where_the_hub_cannot_be_reached_fails_fast_in_one_line(tmp_path):
    """No minute of retries, each said on stderr: one look, then the line that says to
    give a local path."""
    import time

    study = write_study(tmp_path / "s.yaml", f"""\
name: hub
family: {{name: lm, model: someone/no-such-model-cached, data: grammar, stories: 40,
          test_stories: 10}}
strategies: [replace]
generations: 1
seeds: [0]
out: {tmp_path / 'out'}
""")
    start = time.monotonic()
    r = collapse("run", study, "--dry-run", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"{study}: family.model: someone/no-such-model-cached: not cached here, and the "
        "Hugging Face hub cannot be reached from this machine; give the path of a local "
        "copy (a directory with its config.json)")
    assert time.monotonic() - start < 60  # (the hub client alone retried for ~40 s)


def test_size_is_bounded_before_any_work(tmp_path):
    """trials: 10**12 needs petabytes: refused with the number before Ray starts, and the
    dry run says it; a billion generations is refused in validation (the plan would
    loop over them)."""
    out = tmp_path / "out"
    study = write_study(tmp_path / "s.yaml", STUDY.format(out=out))
    r = collapse("run", study, "--set", "family.trials=1000000000000")
    assert r.returncode == 2
    assert r.stderr.strip().startswith(f"{study}: chain replace__seed=0 needs ~7,450,582 GiB "
                                       "of memory"), r.stderr
    assert "run it on a cluster (--address)" in r.stderr and not out.exists()
    r = collapse("run", study, "--set", "family.trials=1000000000000", "--dry-run")
    assert r.returncode == 0 and "memory: each chain's driver needs up to 7,450,581.6 GiB" \
        in r.stdout and "more than this machine has" in r.stdout
    r = collapse("run", study, "--set", "generations=1000000000", "--dry-run")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"{study}: generations (from --set): at most 10,000 generations a chain, got "
        "1,000,000,000")


def test_a_damaged_shared_generation_1_corpus_is_named_as_such_and_its_fix_works_at_once(
        tmp_path):
    """Generation 1's corpus is sampled once and linked into every chain of the study
    (out/shared/). Cut short, it is named as that corpus (not as the prepared real
    data), and deleting it as told makes the next run sample it again and finish: the
    chains' links to the deleted corpus are replaced, not refused as existing. Through
    run_chain, the code Tune runs, in this process."""
    import shutil

    from engine.chain import ChainError, run_chain
    from engine.spec import load_study

    out = tmp_path / "out"
    study = load_study(write_study(tmp_path / "s.yaml", STUDY.format(out=out)))
    chains = study.trials()
    for trial in chains:  # generation 1 only, its corpus sampled (the last generation)
        run_chain(trial.__class__.from_dict({**trial.to_dict(), "sample_last": True}), 1, out)
    shard = next((out / "shared").rglob("synthetic-0001/*.parquet"))
    manifest = shard.parent.parent / "manifest.json"
    written = json.loads(manifest.read_text())["synthetic-0001"]["files"]
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(ChainError) as e:
        run_chain(chains[0], 3, out)
    corpus = shard.parent
    assert (f"{shard}: checksum mismatch (the file changed after it was written); delete "
            f"{corpus} (generation 1's corpus, shared by the study's chains) to have it "
            "sampled again from generation 1's model, with the same seeds") in str(e.value)
    shutil.rmtree(corpus)
    for trial in chains:
        run_chain(trial, 3, out)
    # sampled again with the same seeds: the very same files, linked into both chains
    assert json.loads(manifest.read_text())["synthetic-0001"]["files"] == written
    for trial in chains:
        linked = json.loads((out / "trials" / trial.trial_id / "corpus" / "manifest.json")
                            .read_text())
        assert linked["synthetic-0001"]["files"] == written
        assert (out / "trials" / trial.trial_id / "metrics" / "gen-0003.json").exists()
