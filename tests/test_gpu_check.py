"""bench/gpu_check.py's CPU path. Its inner layer (the fit loop, evaluation and both
samplers without Ray) must run where Ray is not installed, as on an offline GPU machine
that has only torch, transformers and DeepSpeed's wheels; its chain layer runs the glue
between the chain and the families' loops end to end, so a break in it shows here and
not first on a GPU."""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# Ray and vLLM made unimportable, as on a machine without them.
WITHOUT_RAY = textwrap.dedent("""
    import importlib.abc, runpy, sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "vllm"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    sys.argv = ["bench/gpu_check.py", *sys.argv[1:]]
    runpy.run_path("bench/gpu_check.py", run_name="__main__")
    assert not any(m.split(".")[0] in ("ray", "vllm") for m in sys.modules)
""")


@pytest.mark.slow
def test_the_inner_layer_runs_without_ray(tmp_path):
    out = tmp_path / "figures.json"
    r = subprocess.run([sys.executable, "-c", WITHOUT_RAY, "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Ray not installed" in r.stdout and "skipped, Ray is not installed" in r.stdout
    figures = json.loads(out.read_text())
    inner = figures["inner"]
    assert inner["fit"][0]["tokens_per_s"] > 0 and inner["fit"][0]["timed_steps"] == 5
    assert inner["evaluation"]["tokens_per_s"] > 0
    d = inner["decoding"][0]
    assert d["engine_tokens_per_s"] > 0 and d["transformers_tokens_per_s"] > 0
    assert inner["decode_tps"] == {"tiny": round(d["engine_tokens_per_s"])}
    assert "decode rates for `collapse run --dry-run --decode-tps`: tiny=" in r.stdout
    assert "results" not in figures


@pytest.mark.slow
@pytest.mark.heavy
def test_gpu_check_runs_on_this_machine(tmp_path):
    """To keep the suite short the chain layer runs lm (sequences) and diffusion
    (arrays) and leaves out what other tests already run through the same code: vae on
    Ray Train workers (test_images) and vLLM sampling in a chain (test_object_store)."""
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--quick",
                        "--layers", "chain", "--families", "lm,diffusion", "--no-vllm",
                        "--json", str(out)],
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
