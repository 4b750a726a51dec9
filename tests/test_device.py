"""A GPU only where Ray reserved one (engine/fit/device.py)."""
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from engine.fit.device import device_rule, run_here_rule


def never_asked():
    raise AssertionError("a Ray process must not ask CUDA whether it sees a GPU")


def test_the_device_comes_from_what_ray_assigned():
    # a chain's driver on a GPU node, no GPU reserved: the CPU, and CUDA is not asked
    assert device_rule(True, [], never_asked) == "cpu"
    # a sampler actor Ray gave GPU 3: Ray sets CUDA_VISIBLE_DEVICES=3, torch's device 0
    assert device_rule(True, [3], never_asked, "3") == "cuda:0"
    assert device_rule(True, ["5", "6"], never_asked, "5,6") == "cuda:0"
    # CUDA_VISIBLE_DEVICES left alone (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES)
    assert device_rule(True, [2], never_asked, None) == "cuda:2"
    # outside Ray: what the process sees
    assert device_rule(False, [], lambda: True) == "cuda:0"
    assert device_rule(False, [], lambda: False) == "cpu"


def test_gpu_work_runs_here_only_on_a_gpu_ray_reserved_here():
    assert run_here_rule(0, True, True, [], never_asked)  # no GPU wanted
    assert run_here_rule(1, True, True, [0], never_asked)  # Ray gave this process one
    assert not run_here_rule(1, True, True, [], never_asked)  # a driver on a GPU node: a task
    assert not run_here_rule(0.5, False, True, [], lambda: False)  # Ray's driver, no GPU here
    assert run_here_rule(1, False, True, [], lambda: True)  # a plain process that sees one
    assert run_here_rule(1, False, False, [], lambda: False)  # no Ray to reserve one


@pytest.mark.slow
def test_on_a_ray_with_a_gpu_evaluation_moves_to_a_task_that_reserves_it(tmp_path):
    """On a Ray that declares one GPU (this machine has none; Ray reserves it all the
    same), a zero-GPU task, as a chain's driver is, runs on the CPU and sends
    GPU-wanting work to a task that holds the GPU, whose device is cuda:0."""
    script = textwrap.dedent("""
        import json, ray
        from engine.fit import current_device, run_on_gpu

        def where():
            return {"device": str(current_device()), "gpus": list(map(str, ray.get_gpu_ids()))}

        @ray.remote(num_gpus=0, num_cpus=0.5)
        def driver():
            here = where()
            sent = run_on_gpu(1, 0.5, where)
            kept = run_on_gpu(0, 0.5, where)
            return here, sent, kept

        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
                 log_to_driver=False)
        print(json.dumps(ray.get(driver.remote())))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    here, sent, kept = json.loads(r.stdout.strip().splitlines()[-1])
    assert here == {"device": "cpu", "gpus": []}
    assert sent == {"device": "cuda:0", "gpus": ["0"]}
    assert kept == {"device": "cpu", "gpus": []}
