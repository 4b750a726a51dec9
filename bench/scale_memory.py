"""Memory against corpus size: one generation of a grammar study at growing sizes, and
the largest resident memory any one process of the run reached.

Each size runs `collapse run` (a Ray of its own) on a study of N grammar stories: the
real data prepared by the Ray Data pipeline, one fit of a tiny model on a fixed token
budget (on Ray Train workers, or in the chain's own process: each trainer is measured),
evaluation, and N - 200 sampled stories of a few tokens each
written into the store, with their statistics. Every process of the run (the driver,
Ray's services, every worker) is a descendant of that command; the script reads each
one's peak resident set (VmHWM in /proc/PID/status) every 0.1 s and reports the
largest, and which process it was. The engine's promise: no process holds a whole
corpus, so the largest process grows far slower than the corpus (goal: under 1.5x for
10x the stories).

    python bench/scale_memory.py                     # 20k and 200k stories, both trainers
    python bench/scale_memory.py --sizes 20000 200000 2000000 --trainers local
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STUDY = """\
name: scale_{n}
family:
  name: lm
  data: grammar
  stories: {n}
  test_stories: 200
  vocab_size: 300
  model: tiny
  context: 64
  token_budget: 50000      # the same training compute at every size
  batch_size: 16
  trainer: {trainer}
  max_new_tokens: 8        # a few new tokens per sampled story
  sampler: hf
  sampler_cpus: 0.5
  sample_batch_size: 1024
  cpus_per_worker: 0.5
  checkpoint_minutes: 0
  threads: 1
strategies: [replace]
generations: 1
sample_last: true          # the generation's corpus is sampled and stored
seeds: [0]
out: {out}
resources: {{cpus_per_trial: 0.25}}
"""


def _peak_kib(pid: int) -> tuple[int, str]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return 0, ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]), cmdline[:80]
    return 0, cmdline[:80]


def run(n: int, trainer: str, work: Path) -> dict:
    import psutil

    out = work / f"out-{trainer}-{n}"
    study = work / f"scale_{trainer}_{n}.yaml"
    study.write_text(STUDY.format(n=n, out=out, trainer=trainer))
    collapse = Path(sys.executable).parent / "collapse"
    start = time.time()
    proc = subprocess.Popen([str(collapse), "run", str(study)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    peaks: dict[int, tuple[int, str]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            family = [root] + root.children(recursive=True)
        except psutil.Error:
            family = []
        for p in family:
            kib, name = _peak_kib(p.pid)
            if kib > peaks.get(p.pid, (0, ""))[0]:
                peaks[p.pid] = (kib, name or peaks.get(p.pid, (0, ""))[1])
        time.sleep(0.1)
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"collapse run failed at {n} stories:\n{stderr[-3000:]}")
    kib, name = max(peaks.values())
    return {"stories": n, "peak_mib": kib / 1024, "process": name,
            "seconds": time.time() - start, "processes": len(peaks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--trainers", nargs="+", default=["ray", "local"],
                    choices=["ray", "local"])
    a = ap.parse_args()
    for trainer in a.trainers:
        rows = []
        with tempfile.TemporaryDirectory(prefix="scale-memory-") as d:
            for n in a.sizes:
                r = run(n, trainer, Path(d))
                rows.append(r)
                print(f"trainer {trainer}: {r['stories']:>9,} stories: largest process "
                      f"{r['peak_mib']:7.0f} MiB ({r['process'].strip()}); "
                      f"{r['processes']} processes, {r['seconds']:.0f} s", flush=True)
        base = rows[0]
        for r in rows[1:]:
            print(f"trainer {trainer}: {r['stories'] / base['stories']:.0f}x the stories: "
                  f"{r['peak_mib'] / base['peak_mib']:.2f}x the largest process's memory",
                  flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
