"""Denoising diffusion models (DDPM) generation after generation: images, and point sets
such as molecular conformations (the seed paper's diffusion experiments).

Real data: images from the image loaders (scikit-learn's digits by default, MNIST idx,
image folders), or conformations from a GEOM-Drugs pickle (`data: geom:PATH`, the
`molecules` extra: one molecule's conformers, its heavy atoms' 3-D positions, centred).
Each generation trains a fresh ε-network on the strategy's mix with the shared DeepSpeed
loop (engine.fit; L_simple at uniformly drawn steps) and samples by ancestral sampling over
`steps` diffusion steps (the paper: 50).

Rows: `image` (C·H·W pixels in [0, 1]) or `points` (n·3 coordinates, Å).

Metrics: `test_loss` — the reweighted variational bound (L_simple) on REAL held-out
examples, with noise and steps drawn from one fixed generator so every generation is
scored on the same draws; and diversity of the samples: images `sample_distance`,
`pixel_variance`; point sets `sample_distance` (RMSD-free mean pairwise distance of the
centred sets) and `radius_of_gyration`. Images also get `frechet_distance`, `precision`
and `recall` against the real test images in a small classifier's feature space
(engine/families/image_features.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.families.arrays import (ArrayFamily, NetModel, RealLabels, TrainerConfig, batched,
                                    image_diversity, image_preview, mean_pairwise_distance,
                                    rows_from_table, rows_table)
from engine.families.base import ParamError, Presentation, row_weights
from engine.families.images import DIGITS, ImageDataError, load_images, split, split_labels
from engine.files import is_remote

GEOM = "geom:"


@dataclass
class DiffusionReal:
    train: np.ndarray
    test: np.ndarray
    train_chunks: list[pa.Table]
    shape: tuple[int, ...]  # one example: (C, H, W) or (n, 3)
    labels: RealLabels | None = None  # images only: for ArrayFamily.compare's metrics


class _LSimple:
    """The training loss, picklable for Ray Train workers."""

    def __init__(self, steps: int, rotate: bool):
        self.steps, self.rotate = steps, rotate

    def __call__(self, model, batch, generator):
        from engine.families.diffusion.model import eps_losses, schedule
        from engine.fit import split_weights, weighted_mean

        x, weights = split_weights(batch)  # weights: a weighted mix's (workflow `weights`)
        return weighted_mean(eps_losses(model, x, generator, schedule(self.steps)[2],
                                        self.rotate), weights)


class _Build:
    def __init__(self, architecture: dict):
        self.architecture = architecture

    def __call__(self):
        from engine.families.diffusion.model import build

        return build(self.architecture)


class Diffusion(ArrayFamily):
    name = "diffusion"
    weighted_fit = True  # a weighted mix's example weights (_LSimple)
    metrics = ("test_loss", "sample_distance", "pixel_variance", "radius_of_gyration",
               "frechet_distance", "precision", "recall")
    # point sets (molecules) have no image to preview
    presentation = Presentation(previews=lambda family, table: None if family.points else
                                image_preview(table, family.config.channels,
                                              family.config.image_size))
    path_fields = ("data",)
    path_keywords = (DIGITS,)

    @dataclass(frozen=True)
    class Config(TrainerConfig):
        data: str = DIGITS  # "digits", an MNIST idx3 file, an image folder, or geom:PICKLE
        max_examples: int | None = None  # read only the first N images / conformers
        test_examples: int = 300  # held-out REAL examples, fixed per study seed
        train_examples: int | None = None  # T per generation (default: all not held out)
        image_size: int = 8  # images are resized to image_size × image_size
        channels: int = 1  # 1 (grey) or 3 (colour)
        width: int = 64  # channels (images) or hidden units (points) of the ε-network
        steps: int = 50  # diffusion steps, for training and for ancestral sampling
        epochs: float = 50.0  # passes over the mix per generation
        batch_size: int = 64  # examples per step per worker
        lr: float = 2e-3  # peak learning rate (AdamW, warmup then cosine decay)
        sample_diversity_n: int = 500  # samples the diversity metrics look at

    @classmethod
    def resolve_path(cls, value: str, base: Path) -> str:
        if value.startswith(GEOM):  # geom:PICKLE: the pickle's path follows the prefix
            return GEOM + super().resolve_path(value[len(GEOM):], base)
        return super().resolve_path(value, base)

    @property
    def points(self) -> bool:
        """Point sets (GEOM conformations) rather than images."""
        return self.config.data.startswith(GEOM)

    @property
    def column(self) -> str:
        return "points" if self.points else "image"

    def validate(self) -> None:
        p = self.config
        for key, low in (("test_examples", 1), ("width", 8), ("steps", 2), ("batch_size", 1),
                         ("sample_diversity_n", 2), ("workers", 1)):
            if getattr(p, key) < low:
                raise ParamError(key, f"must be >= {low}, got {getattr(p, key)}")
        if p.width % 8:
            raise ParamError("width", f"must be a multiple of 8 (group norm), got {p.width}")
        if p.epochs <= 0 or p.lr <= 0:
            raise ParamError("epochs" if p.epochs <= 0 else "lr", "must be > 0")
        path = p.data[len(GEOM):] if self.points else p.data
        if path != DIGITS and not is_remote(path) and not Path(path).exists():
            raise ParamError("data", f"{path}: no such file or folder (give `digits`, an MNIST "
                                     "idx3 file, a folder of images, or geom:PICKLE)")

    # ------------------------------------------------------------------ real data
    def real_data(self, seed: int, chunks: int, cache_dir: Path | None = None) -> DiffusionReal:
        p = self.config
        try:
            if self.points:
                from engine.families.diffusion.geom import load_conformers

                examples = load_conformers(p.data[len(GEOM):], p.max_examples)
            else:
                examples = load_images(p.data, p.image_size, p.channels, p.max_examples)
        except ImageDataError as e:
            raise ImageDataError(f"family.data: {e}") from None
        train, test, T = split(examples, p.data, p.test_examples, p.train_examples, chunks, seed,
                               "test_examples", "train_examples")
        labels = None if self.points else split_labels(
            p.data, p.max_examples, len(examples), p.test_examples, p.train_examples, chunks,
            seed)
        return DiffusionReal(train=train, test=test, shape=tuple(examples.shape[1:]),
                             train_chunks=[rows_table(self.column, train[k * T:(k + 1) * T])
                                           for k in range(chunks)], labels=labels)

    # -------------------------------------------------------------- model and loops
    def _to_model_space(self, x):
        # Images live in [0, 1]; the diffusion runs on [-1, 1], the scale its noise assumes.
        return x if self.points else 2 * x - 1

    def network(self, architecture: dict):
        from engine.families.diffusion.model import build

        return build(architecture)

    def fit(self, real: DiffusionReal, mix: pa.Table, seed: int, context) -> NetModel:
        p = self.config
        examples = self._to_model_space(rows_from_table(mix, self.column, real.shape))
        architecture = ({"kind": "points", "points": real.shape[0]} if self.points else
                        {"kind": "images", "channels": real.shape[0]})
        architecture.update(width=p.width, steps=p.steps)
        return self.fit_network(_Build(architecture), examples, _LSimple(p.steps, self.points),
                                seed, context, weights=row_weights(mix))

    def evaluate(self, real: DiffusionReal, model: NetModel) -> dict[str, float]:
        from engine.fit import run_on_gpu

        test = self._to_model_space(real.test)
        return run_on_gpu(self.evaluation_gpus(), self.config.cpus_per_worker, _diffusion_scores,
                          test, model.net, self.config.steps, self.points)

    def sample(self, real: DiffusionReal, model: NetModel, n: int, seed: int) -> pa.Table:
        """Ancestral sampling where the study's GPUs are (a GPU Ray reserved,
        engine/fit/device.py); every draw from a CPU generator seeded here."""
        from engine.fit import run_on_gpu

        x = run_on_gpu(self.evaluation_gpus(), self.config.cpus_per_worker, _sample,
                       model.net, n, tuple(real.shape), seed)
        if not self.points:
            x = np.clip((x + 1) / 2, 0, 1)
        return rows_table(self.column, x)

    def sample_stats(self, table: pa.Table) -> dict[str, float]:
        p = self.config
        if not self.points:
            return image_diversity(table, p.sample_diversity_n)
        flat = table.column("points").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        pts = flat.reshape(table.num_rows, -1, 3)[:p.sample_diversity_n].astype(np.float64)
        pts = pts - pts.mean(axis=1, keepdims=True)
        gyration = np.sqrt((pts ** 2).sum(axis=2).mean(axis=1))
        return {"sample_distance": mean_pairwise_distance(pts.reshape(len(pts), -1)),
                "radius_of_gyration": float(gyration.mean())}

    def cost(self):
        from engine.plan import Cost

        p = self.config
        # digits: 1,797 images; other data is not read for a plan (set train_examples to plan it)
        real = 1797 - p.test_examples if p.data == DIGITS else None
        return Cost(rows_per_generation=p.train_examples or real or 0, tokens_per_row=None,
                    parameters=None, real_rows=real, rows_field="train_examples")

    def model_name(self) -> str:
        return f"ddpm-{'points' if self.points else 'images'}-w{self.config.width}-s{self.config.steps}"


def _sample(net, n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """n examples by ancestral sampling on this process's device, 512 at a time."""
    import torch

    from engine.families.diffusion.model import ancestral_sample
    from engine.fit import current_device

    net = net.to(current_device())
    g = torch.Generator().manual_seed(seed % 2**63)
    out = [ancestral_sample(net, (min(512, n - s), *shape), g).cpu().numpy()
           for s in range(0, n, 512)]
    return np.concatenate(out) if out else np.zeros((0, *shape), np.float32)


def _diffusion_scores(test: np.ndarray, net, steps: int, points: bool) -> dict[str, float]:
    """L_simple on REAL held-out examples, on this process's device: four passes, the
    same noise, steps (and rotations) for every generation and strategy."""
    import torch

    from engine.families.diffusion.model import eps_loss, schedule
    from engine.fit import current_device

    device = current_device()
    net = net.to(device).eval()
    alpha_bar = schedule(steps)[2]
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for _ in range(4):
            for rows in batched(len(test)):
                x = torch.from_numpy(np.ascontiguousarray(test[rows])).to(device)
                losses.append((float(eps_loss(net, x, g, alpha_bar, points)), len(x)))
    return {"test_loss": float(sum(v * n for v, n in losses) / sum(n for _, n in losses))}
