"""Studies as Ray Jobs on a cluster: submit, follow, status, logs, stop.

`collapse submit STUDY.yaml --address http://HEAD:8265` is the engine's form of

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m engine.cli run STUDY.yaml [--set KEY=VALUE ...]

Ray packages the working directory (this project, without .venv, results and .git)
and the job runs `collapse run` on the head node against the cluster, so the code that
runs is the code submitted. The study is validated here first: a bad study fails on
the researcher's machine, before anything is uploaded.
"""
from __future__ import annotations

import asyncio
import fnmatch
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from engine.errors import SpecError, Unreachable

# Never uploaded with a job: environments, outputs, caches (Ray also honours .gitignore).
# What a job takes from the working directory: the package, the study files and the
# files a study names, nothing else (a project's directory also holds .env files, keys
# and credentials, which must never leave the machine). Never taken, even when named:
NEVER = (".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info",
         ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*",
         "id_ecdsa*", ".netrc", ".aws", ".ssh", ".gnupg", ".docker", ".kube", "*credentials*",
         "*secret*", "*token*", ".npmrc", ".pypirc", "results")
TAKEN = ("engine", "studies", "pyproject.toml")
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60  # how long a submit waits for a just-started head's job agent


@dataclass(frozen=True)
class Submitted:
    job_id: str
    entrypoint: str


def _use_token_if_present() -> None:
    """Ray 2.60 clusters started where a Ray token exists (~/.ray/auth_token, or
    RAY_AUTH_TOKEN[_PATH]) require it, but the job client only sends it in token mode.
    Do what ray.init does when it joins a cluster: token mode if a token is there."""
    import logging

    try:
        from ray._private.authentication import authentication_token_setup as auth
    except ImportError:  # a Ray without token authentication
        return
    quiet = logging.getLogger(auth.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    _use_token_if_present()
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise Unreachable(f"collapse: cannot reach the Ray cluster: {e}") from None
    except (RuntimeError, ValueError) as e:
        # e.g. no address given and no RAY_ADDRESS / RAY_API_SERVER_ADDRESS set
        raise Unreachable(f"{e} (give --address http://HEAD:8265, the head's dashboard)") \
            from None


def entrypoint(study_file: str, overrides: Sequence[str]) -> str:
    args = ["python", "-m", "engine.cli", "run", study_file]
    for o in overrides:
        args += ["--set", o]
    return shlex.join(args)


def _never(relative: Path) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in NEVER)


def pack(root: Path, study_file: Path, study) -> tuple[Path, list[tuple[str, int]]]:
    """A staging copy of what the job needs from `root`: the package (engine/), the
    studies (studies/, the study file), pyproject.toml and the local files and
    directories the study's parameters name inside `root`; never a file matching NEVER.
    (The directory, and [(relative path, bytes)] of what it holds.)"""
    import shutil
    import tempfile

    from engine.families import family_for

    wanted = [root / name for name in TAKEN] + [study_file]
    for trial in study.trials():
        family = family_for(trial)
        for key in family.path_fields:
            values = trial.params.get(key)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, str) and Path(value).is_absolute():
                    wanted.append(Path(value))
    files = set()
    for where in wanted:
        where = where.resolve()
        if not where.exists() or not where.is_relative_to(root):
            continue
        for f in ([where] if where.is_file() else where.rglob("*")):
            if f.is_file() and not _never(f.relative_to(root)):
                files.add(f)
    staging = Path(tempfile.mkdtemp(prefix="collapse-job-"))
    packed = []
    for f in sorted(files):
        relative = f.relative_to(root)
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, staging / relative)
        packed.append((str(relative), f.stat().st_size))
    return staging, packed


def submit(study_path: str | Path, overrides: Sequence[str], address: str | None,
           working_dir: str | Path = ".",
           say: Callable[[str], None] = lambda s: print(s, flush=True)) -> Submitted:
    """Validate the study here, then submit `collapse run` of it as a Ray Job."""
    import engine
    from engine.files import is_remote

    study = engine.load_study(study_path, overrides)
    if not is_remote(study.out) and not Path(study.out).is_absolute():
        # The job's working directory is a temporary copy on the head node: results
        # written under it would be lost when the job ends, and other nodes never see it.
        raise SpecError(f"{study_path}: out: {study.out} is a relative path, which a job "
                        "would write inside its temporary working directory on the head "
                        "node; give a directory every node mounts or a bucket, e.g. --set "
                        f"out=/mnt/shared/{study.name} or out=s3://BUCKET/{study.name}")
    root = Path(working_dir).resolve()
    path = Path(study_path).resolve()
    if not path.is_relative_to(root):
        raise SpecError(f"{study_path}: the study file must lie inside the working directory "
                        f"{root}, which is what the job uploads; move it there or pass "
                        "--working-dir")
    command = entrypoint(str(path.relative_to(root)), overrides)
    client = _client(address)
    staging, packed = pack(root, path, study)
    say(f"packed {len(packed)} files, {sum(size for _, size in packed) / 1e6:.2f} MB: "
        + ", ".join(sorted({p.split('/')[0] for p, _ in packed})))
    # A head that has just started answers before its job agent is up ("No available
    # agent to submit job, please try again later"): try again for a while.
    deadline = time.monotonic() + AGENT_WAIT_S
    try:
        while True:
            try:
                job_id = client.submit_job(
                    entrypoint=command,
                    runtime_env={"working_dir": str(staging)},  # uploaded here, as a zip
                    metadata={"study": study.name, "out": str(study.out)},
                )
                return Submitted(job_id, command)
            except RuntimeError as e:
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1)
    finally:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)


def follow(job_id: str, address: str | None,
           write: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> str:
    """Stream a job's logs until it ends; return its final status."""
    client = _client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())
    # The log stream can end a moment before the status is final.
    status = str(client.get_job_status(job_id))
    deadline = time.time() + 30
    while status.split(".")[-1] not in FINAL and time.time() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status.split(".")[-1]


def status(address: str | None, job_id: str | None = None) -> list[dict[str, str]]:
    """One row per job (or the one asked for): id, status, study, message."""
    client = _client(address)
    jobs = [client.get_job_info(job_id)] if job_id else client.list_jobs()
    rows = []
    for j in jobs:
        rows.append({"job_id": j.submission_id or j.job_id or "",
                     "status": str(j.status).split(".")[-1],
                     "study": (j.metadata or {}).get("study", ""),
                     "out": (j.metadata or {}).get("out", ""),
                     "message": (j.message or "").splitlines()[0] if j.message else ""})
    return rows


def logs(job_id: str, address: str | None) -> str:
    return _client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None) -> bool:
    return _client(address).stop_job(job_id)


def exit_code(final_status: str) -> int:
    return 0 if final_status == "SUCCEEDED" else 1

