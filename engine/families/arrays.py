"""What the neural families on fixed-size float rows share (vae, ae, diffusion): the
table a corpus of images or point sets is stored as, how a network is fit to one
through engine.fit (in the chain's process or on Ray Train workers), saved and loaded,
and the diversity measures of their samples."""
from __future__ import annotations

import json
import logging
import tempfile
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa

from engine.errors import BadInput
from engine.families.base import Bundle, Family, Processes, fit, later_fits

Curve = list[tuple[int, float]]
log = logging.getLogger("engine.arrays")


@dataclass(frozen=True)
class TrainerConfig:
    """Where an array family's fit runs; every array family's Config extends it."""

    trainer: Literal["local", "ray"] = fit("local")  # local: the chain's process; ray: Ray Train workers
    workers: int = fit(1)  # Ray Train workers (trainer: ray), each on an equal share of the mix
    cpus_per_worker: float = fit(1.0)  # CPUs each Ray Train worker holds
    gpus_per_worker: float = fit(0.0)  # GPUs each Ray Train worker holds; > 0 evaluates on a GPU too
    threads: int = fit(0)  # torch CPU threads of the fit; 0: torch's default
    precision: Literal["auto", "fp32", "bf16"] = fit("auto")  # auto: bf16 autocast on GPUs that have it (TF32 matmuls where fp32), fp32 on CPUs
    start: Literal["scratch", "warm"] = later_fits("scratch")  # scratch: fresh weights every generation (the paper); warm: the previous generation's (Bertrand et al. 2024)


# ------------------------------------------------------------------------- tables

def rows_table(column: str, examples: np.ndarray) -> pa.Table:
    """One row per example: its values flattened into a fixed-size list of float32."""
    flat = np.ascontiguousarray(examples, dtype=np.float32).reshape(len(examples), -1)
    return pa.table({column: pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()),
                                                               flat.shape[1])})


def rows_from_table(table: pa.Table, column: str, shape: tuple[int, ...]) -> np.ndarray:
    flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, *shape).astype(np.float32)


def image_table(images: np.ndarray) -> pa.Table:
    return rows_table("image", images)


def mean_pairwise_distance(rows: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows (a diversity measure of samples)."""
    if len(rows) < 2:
        return 0.0
    sq = (rows ** 2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0)
    return float(np.sqrt(d2[np.triu_indices(len(rows), k=1)]).mean())


def image_diversity(table: pa.Table, n: int) -> dict[str, float]:
    """Diversity of a sampled image corpus, over its first `n` images."""
    flat = table.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    images = flat.reshape(table.num_rows, -1)[:n].astype(np.float64)
    if len(images) < 2:
        return {}
    return {"sample_distance": mean_pairwise_distance(images),
            "pixel_variance": float(images.var(axis=0).mean())}


def image_preview(table: pa.Table, channels: int, size: int) -> np.ndarray:
    """The first images of a corpus, (k, H, W) grey or (k, H, W, 3) colour, for the
    sample grids of `collapse plot`."""
    images = rows_from_table(table.slice(0, 16), "image", (channels, size, size))
    return images[:, 0] if channels == 1 else images.transpose(0, 2, 3, 1)


def batched(n: int, size: int = 4096) -> list[slice]:
    """Slices of `size` over n rows. Test sets up to `size` rows are scored in one pass,
    so their fixed noise draws do not depend on how they were batched."""
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


# ---------------------------------------------------------------------- fitting

@dataclass
class NetModel:
    """A trained network, its loss curve, and arrays fitted beside it (the autoencoder's
    latent Gaussian)."""

    net: Any
    curve: Curve
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    record: dict | None = None  # how the fit went (engine.fit's fit.json)


class ExampleBatches:
    """Each worker's batches: an equal share of the examples (equal, so that workers
    take the same number of steps: otherwise they wait for each other's gradients
    forever), reshuffled every epoch. The examples travel once through Ray's object
    store when a list holding their reference is given (a list keeps Ray from resolving
    the reference before a worker asks for it)."""

    def __init__(self, examples: np.ndarray | list, batch_size: int, seed: int,
                 weights: np.ndarray | list | None = None):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.weights = weights  # each example's loss weight (a weighted mix), or None

    def __call__(self, rank: int, world: int):
        import torch

        from engine.fit import shuffled_batches

        examples, weights = self.examples, self.weights
        if isinstance(examples, list):
            import ray

            examples = ray.get(examples[0])
            weights = None if weights is None else ray.get(weights[0])
        per_worker = len(examples) // world
        mine = slice(rank * per_worker, (rank + 1) * per_worker)
        shard = np.ascontiguousarray(examples[mine])
        return shuffled_batches(torch.from_numpy(shard), self.batch_size, self.seed,
                                None if weights is None else
                                torch.from_numpy(np.ascontiguousarray(weights[mine],
                                                                      dtype=np.float32)))


def save_network(module: Any, curve: Curve, out: Path) -> None:
    """Weights (on the CPU), the architecture that rebuilds them, and the loss curve."""
    import torch

    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, out / "net.pt")
    (out / "model.json").write_text(json.dumps({"architecture": module.architecture,
                                                "curve": curve}))


class WarmStart:
    """A network factory that starts from a saved network's weights (the previous
    generation's, a path or URI: each Ray Train worker reads its node's copy); picklable."""

    def __init__(self, build: Callable[[], Any], saved: str):
        self.build, self.saved = build, saved

    def __call__(self):
        import torch

        from engine.files import local_copy

        net = self.build()
        net.load_state_dict(torch.load(local_copy(self.saved) / "net.pt", weights_only=True))
        return net


@dataclass(frozen=True)
class RealLabels:
    """The classes of the real training and test examples, where the data has them
    (engine/families/images.py: load_labels), split as the examples are."""

    train: np.ndarray
    test: np.ndarray
    seed: int


class ArrayFamily(Family):
    """A family whose model is one torch network fit with engine.fit's loop."""

    column = "image"  # the corpus column of one example

    def compare(self, real, first_model, model, corpus) -> tuple[dict[str, float], dict]:
        """Image corpora against the real test images in the feature space of a small
        classifier trained on the real training images (engine/families/image_features.py):
        frechet_distance, precision, recall. The classifier learns the data's classes
        (`real.labels`) where it has them, else each image's quarter turn. Point clouds
        (examples that are not (C, H, W) images) get none of these."""
        from engine.families import image_features

        if corpus is None or len(real.shape) != 3:
            return {}, {}
        if getattr(self, "_classifier", None) is None:  # once per chain process
            self._classifier = self._feature_net(real)
        samples = rows_from_table(corpus.head(image_features.MAX_EXAMPLES), self.column,
                                  real.shape)
        return image_features.sample_quality(self._classifier, real.test, samples), {}

    @staticmethod
    def _feature_net(real):
        from engine.families import image_features

        labels: RealLabels | None = getattr(real, "labels", None)
        if labels is not None:
            net = image_features.train_classifier(real.train, labels.train, labels.seed)
            accuracy = image_features.accuracy(net, real.test, labels.test)
            task = "the data's classes"
        else:
            # The same network for every chain and seed of a study: one measuring
            # instrument (the labelled case's differs with the seed's split anyway).
            net = image_features.train_rotation_net(real.train, seed=0)
            accuracy = image_features.rotation_accuracy(net, real.test, seed=1)
            task = "each image's quarter turn (the data has no classes)"
        log.warning("image features: a classifier trained on the %d real training images "
                    "to tell %s (accuracy %.3f on the %d real test images)",
                    min(len(real.train), image_features.MAX_TRAINING), task, accuracy,
                    len(real.test))
        return net

    @abstractmethod
    def network(self, architecture: dict) -> Any:
        """A fresh network of this architecture (the `architecture` attribute of the
        networks the family builds)."""

    def fit_network(self, build: Callable[[], Any], examples: np.ndarray, loss, seed: int,
                    context, weights: np.ndarray | None = None) -> NetModel:
        """A fresh `build()` (or, with start: warm, the previous generation's network)
        trained on `examples` for `epochs`: AdamW, warmup + cosine
        decay, in this process (trainer: local) or on Ray Train workers, each on its
        equal share of the examples, gradients averaged by DeepSpeed. `weights`: each
        example's loss weight (a weighted mix's, base.row_weights); the loss then gets
        (examples, weights) batches."""
        from engine.fit import FitJob, LoopConfig, Workers, fit_here, fit_on_workers

        p = self.config
        previous = getattr(context, "previous_model", None)
        if p.start == "warm" and previous is not None:
            build = WarmStart(build, previous.uri)
            log.info("fit: warm start from %s", previous)
        workers = p.workers if p.trainer == "ray" else 1
        per_worker = len(examples) // workers
        if per_worker < p.batch_size:
            raise BadInput(f"family.batch_size: the mix holds {per_worker} examples per "
                             f"worker, fewer than one batch of {p.batch_size}")
        steps = max(1, int(round(p.epochs * (per_worker // p.batch_size))))
        loop = LoopConfig(steps=steps, batch_size=p.batch_size, lr=p.lr, warmup=0.05,
                          min_lr_ratio=0.05, weight_decay=getattr(p, "weight_decay", 0.0),
                          seed=seed, log_every=max(1, steps // 50), threads=p.threads,
                          # conv nets: bf16 as autocast over fp32 weights (DeepSpeed's
                          # bf16 mode would hold the weights themselves in bf16)
                          precision=p.precision, autocast=True)
        with tempfile.TemporaryDirectory(prefix="collapse-fit-") as d:
            out = Path(d)
            if p.trainer == "local":
                fit_here(FitJob(build, ExampleBatches(examples, p.batch_size, seed, weights),
                                loss, save_network, loop), out, context.progress)
            else:
                import ray

                shared = [ray.put(np.ascontiguousarray(examples))]
                shared_weights = None if weights is None else [ray.put(weights)]
                job = FitJob(build, ExampleBatches(shared, p.batch_size, seed, shared_weights),
                             loss, save_network, loop)
                fit_on_workers(job, Workers(max_workers=p.workers,
                                            cpus_per_worker=p.cpus_per_worker,
                                            gpus_per_worker=p.gpus_per_worker),
                               context.workdir / "ray_train", out, context.callbacks,
                               progress=context.progress)
            return self._read_network(out)

    def _read_network(self, directory: Path) -> NetModel:
        import torch

        from engine.fit import FIT_RECORD

        meta = json.loads((directory / "model.json").read_text())
        net = self.network(meta["architecture"])
        net.load_state_dict(torch.load(directory / "net.pt", weights_only=True))
        arrays = {f.stem: np.load(f) for f in sorted(directory.glob("*.npy"))}
        record = directory / FIT_RECORD
        return NetModel(net=net.eval(), curve=[tuple(c) for c in meta["curve"]], arrays=arrays,
                        record=json.loads(record.read_text()) if record.exists() else None)

    def save_model(self, model: NetModel, directory: Path) -> None:
        from engine.fit import FIT_RECORD

        save_network(model.net, model.curve, directory)
        for name, values in model.arrays.items():
            np.save(directory / f"{name}.npy", values)
        if model.record is not None:
            (directory / FIT_RECORD).write_text(json.dumps(model.record))

    def load_model(self, directory) -> NetModel:
        from engine.files import local_copy

        return self._read_network(local_copy(directory))  # the run may be in an object store

    def curves(self, model: NetModel) -> dict[str, Curve]:
        return {"train_loss": model.curve}

    def evaluation_gpus(self) -> float:
        """GPUs evaluation asks for: the trainer workers' (trainer: ray), capped at one."""
        p = self.config
        return min(1.0, p.gpus_per_worker) if p.trainer == "ray" else 0.0

    def placement(self) -> list[Processes]:
        p = self.config
        if p.trainer != "ray":
            return []
        return [Processes(Bundle("trainer worker",
                                 {"CPU": p.cpus_per_worker, "GPU": p.gpus_per_worker},
                                 {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}),
                          p.workers, "fit")]
