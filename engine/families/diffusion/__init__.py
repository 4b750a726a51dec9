"""Denoising diffusion models (DDPM) generation after generation: images, and point sets
such as molecular conformations (the seed paper's diffusion experiments).

Real data: images from the image loaders (scikit-learn's digits by default, MNIST idx,
image folders), or conformations from a GEOM-Drugs pickle (`data: geom:PATH`, the
`molecules` extra: one molecule's conformers, its heavy atoms' 3-D positions, centred).
Each generation trains a fresh ε-network on the strategy's mix with the shared DeepSpeed
loop (L_simple at uniformly drawn steps) and samples by ancestral sampling over
`steps` diffusion steps (the paper: 50).

Rows: `image` (C·H·W pixels in [0, 1]) or `points` (n·3 coordinates, Å).

Metrics: `test_loss` — the reweighted variational bound (L_simple) on REAL held-out
examples, with noise and steps drawn from one fixed generator so every generation is
scored on the same draws; and diversity of the samples: images `sample_distance`,
`pixel_variance`; point sets `sample_distance` (RMSD-free mean pairwise distance of the
centred sets) and `radius_of_gyration`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.families.base import ParamError
from engine.families.deepspeed_fit import (  # noqa: F401 — interface functions
    TrainerParams, chain_cpus, chain_gpus, placement)
from engine.families.vae import (  # noqa: F401 — curves: the family interface
    curves, image_table, images_from_table, mean_pairwise_distance)
from engine.families.vae import preview as image_preview
from engine.families.vae import sample_stats as image_stats
from engine.families.vae.data import DIGITS, ImageDataError, load_images, split

name = "diffusion"
metrics = ("test_loss", "sample_distance", "pixel_variance", "radius_of_gyration")
GEOM = "geom:"


@dataclass(frozen=True)
class Params(TrainerParams):
    data: str = DIGITS  # "digits", an MNIST idx3 file, an image folder, or geom:PICKLE
    max_examples: int | None = None  # read only the first N images / conformers
    test_examples: int = 300  # held-out REAL examples, fixed per study seed
    train_examples: int | None = None  # T per generation (default: all not held out)
    image_size: int = 8
    channels: int = 1
    width: int = 64  # channels (images) or hidden units (points) of the ε-network
    steps: int = 50  # diffusion steps, for training and for ancestral sampling
    epochs: float = 50.0
    batch_size: int = 64
    lr: float = 2e-3
    threads: int = 0  # torch threads; 0: torch default
    sample_diversity_n: int = 500  # samples the diversity metrics look at


def points_kind(p: Params) -> bool:
    return p.data.startswith(GEOM)


def validate(p: Params) -> None:
    for key, low in (("test_examples", 1), ("width", 8), ("steps", 2), ("batch_size", 1),
                     ("sample_diversity_n", 2), ("workers", 1)):
        if getattr(p, key) < low:
            raise ParamError(key, f"must be >= {low}, got {getattr(p, key)}")
    if p.width % 8:
        raise ParamError("width", f"must be a multiple of 8 (group norm), got {p.width}")
    if p.epochs <= 0 or p.lr <= 0:
        raise ParamError("epochs" if p.epochs <= 0 else "lr", "must be > 0")
    path = p.data[len(GEOM):] if points_kind(p) else p.data
    if path != DIGITS and "://" not in path and not Path(path).exists():
        raise ParamError("data", f"{path}: no such file or folder (give `digits`, an MNIST "
                                 "idx3 file, a folder of images, or geom:PICKLE)")


# ------------------------------------------------------------------------ real data

@dataclass
class DiffusionReal:
    train: np.ndarray
    test: np.ndarray
    train_chunks: list[pa.Table]
    shape: tuple[int, ...]  # one example: (C, H, W) or (n, 3)


def points_table(points: np.ndarray) -> pa.Table:
    flat = np.ascontiguousarray(points, dtype=np.float32).reshape(len(points), -1)
    return pa.table({"points": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()),
                                                                 flat.shape[1])})


def _table(p: Params, examples: np.ndarray) -> pa.Table:
    return points_table(examples) if points_kind(p) else image_table(examples)


def _examples(p: Params, table: pa.Table, shape) -> np.ndarray:
    if not points_kind(p):
        return images_from_table(table, shape)
    flat = table.column("points").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, *shape).astype(np.float32)


def real_data(p: Params, seed: int, chunks: int, cache_dir: Path | None = None) -> DiffusionReal:
    try:
        if points_kind(p):
            from engine.families.diffusion.geom import load_conformers

            examples = load_conformers(p.data[len(GEOM):], p.max_examples)
        else:
            examples = load_images(p.data, p.image_size, p.channels, p.max_examples)
    except ImageDataError as e:
        raise ImageDataError(f"family.data: {e}") from None
    train, test, T = split(examples, p.data, p.test_examples, p.train_examples, chunks, seed,
                           "test_examples", "train_examples")
    return DiffusionReal(train=train, test=test, shape=tuple(examples.shape[1:]),
                         train_chunks=[_table(p, train[k * T:(k + 1) * T]) for k in range(chunks)])


# ----------------------------------------------------------------- model and loops

@dataclass
class DiffusionModel:
    net: object
    curve: list[tuple[int, float]]


def _to_model_space(p: Params, x):
    # Images live in [0, 1]; the diffusion runs on [-1, 1], the scale its noise assumes.
    return x if points_kind(p) else 2 * x - 1


def fit(p: Params, real: DiffusionReal, mix: pa.Table, seed: int, workdir: Path | None = None
        ) -> DiffusionModel:
    from engine.families.deepspeed_fit import fit_with

    examples = _examples(p, mix, real.shape)
    if not points_kind(p):
        examples = _to_model_space(p, examples)
    net, curve = fit_with(p, _net_factory(p, real.shape), examples, _LSimple(p.steps, points_kind(p)),
                          seed, workdir)
    return DiffusionModel(net=net, curve=curve)


def _net_factory(p: Params, shape):
    from engine.families.diffusion.model import ImageEps, PointEps

    points, width, steps, first = points_kind(p), p.width, p.steps, shape[0]
    return lambda: PointEps(first, width, steps) if points else ImageEps(first, width, steps)


class _LSimple:
    """The training loss, picklable for Ray Train workers."""

    def __init__(self, steps: int, rotate: bool):
        self.steps, self.rotate = steps, rotate

    def __call__(self, net, batch, generator):
        from engine.families.diffusion.model import eps_loss, schedule

        return eps_loss(net, batch, generator, schedule(self.steps)[2], self.rotate)


def evaluate(p: Params, real: DiffusionReal, model: DiffusionModel) -> dict[str, float]:
    import torch

    from engine.families.diffusion.model import eps_loss, schedule

    x = _to_model_space(p, torch.from_numpy(real.test))
    alpha_bar = schedule(p.steps)[2]
    # The same noise, steps (and rotations) for every generation and strategy.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = [float(eps_loss(model.net, x, g, alpha_bar, points_kind(p))) for _ in range(4)]
    return {"test_loss": float(np.mean(losses))}


def sample(p: Params, real: DiffusionReal, model: DiffusionModel, n: int, seed: int) -> pa.Table:
    import torch

    from engine.families.diffusion.model import ancestral_sample

    g = torch.Generator().manual_seed(seed % 2**63)
    out = [ancestral_sample(model.net, (min(512, n - s), *real.shape), g).numpy()
           for s in range(0, n, 512)]
    x = np.concatenate(out) if out else np.zeros((0, *real.shape), np.float32)
    if not points_kind(p):
        x = np.clip((x + 1) / 2, 0, 1)
    return _table(p, x)


def sample_stats(p: Params, table: pa.Table) -> dict[str, float]:
    if not points_kind(p):
        return image_stats(p, table)
    flat = table.column("points").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    pts = flat.reshape(table.num_rows, -1, 3)[:p.sample_diversity_n].astype(np.float64)
    pts = pts - pts.mean(axis=1, keepdims=True)
    gyration = np.sqrt((pts ** 2).sum(axis=2).mean(axis=1))
    return {"sample_distance": mean_pairwise_distance(pts.reshape(len(pts), -1)),
            "radius_of_gyration": float(gyration.mean())}


def preview(p: Params, table: pa.Table):
    if points_kind(p):
        return None
    from engine.families.vae import Params as ImageParams

    return image_preview(ImageParams(image_size=p.image_size, channels=p.channels), table)


def save_model(model: DiffusionModel, directory: Path) -> None:
    import json

    import torch

    torch.save(model.net.state_dict(), directory / "net.pt")
    (directory / "model.json").write_text(json.dumps({"architecture": model.net.architecture,
                                                      "curve": model.curve}))


def load_model(directory) -> DiffusionModel:
    import json

    import torch

    from engine.families.diffusion.model import build
    from engine.files import local_copy

    directory = local_copy(directory)  # the run may live in an object store

    meta = json.loads((Path(directory) / "model.json").read_text())
    net = build(meta["architecture"])
    net.load_state_dict(torch.load(Path(directory) / "net.pt", weights_only=True))
    return DiffusionModel(net=net.eval(), curve=[tuple(c) for c in meta["curve"]])


def cost(p: Params):
    from engine.plan import Cost

    # digits: 1,797 images; other data is not read for a plan (set train_examples to plan it)
    rows = p.train_examples or (1797 - p.test_examples if p.data == DIGITS else 0)
    return Cost(rows_per_generation=rows, tokens_per_row=None, parameters=None)


def model_name(p: Params) -> str:
    return f"ddpm-{'points' if points_kind(p) else 'images'}-w{p.width}-s{p.steps}"
