"""bench/gpu_check.py's CPU path: the glue between the chain and the families' loops
(fit on a Ray Train worker, evaluation, hf sampling) runs end to end, so a break in it
shows here and not first on a GPU. To keep the suite short it runs lm (sequences) and
diffusion (arrays) and leaves out what other tests already run through the same code:
vae on Ray Train workers (test_images) and vLLM sampling in a chain (test_object_store)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
@pytest.mark.heavy
def test_gpu_check_runs_on_this_machine(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--quick",
                        "--families", "lm,diffusion", "--no-vllm", "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = json.loads(out.read_text())
    by_family = {f["family"]: f for f in figures["results"]}
    assert set(by_family) == {"lm", "diffusion"}
    for f in by_family.values():
        assert {"fit", "evaluate", "sample"} <= set(f["seconds"])
        assert f["fit"]["world_size"] == 1 and f["fit"]["loop_steps"] == f["fit"]["steps"] > 0
        assert 0 < f["fit"]["loop_seconds"] < f["seconds"]["fit"]
        assert 0 < f["metrics"]["test_loss"] < float("inf")
    lm = by_family["lm"]
    assert lm["train_tokens_per_s"] > 0 and lm["eval_tokens_per_s"] > 0
    assert set(lm["sample_tokens_per_s"]) == {"hf"}
    assert all(v > 0 for v in lm["sample_tokens_per_s"].values())
    assert "lm:" in r.stdout and "training" in r.stdout and "tokens/s" in r.stdout
