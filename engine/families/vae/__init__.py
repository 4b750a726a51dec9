"""Variational autoencoders on images, generation after generation (the seed paper's
App. D; the survey's MNIST figures).

Real data: images (scikit-learn's digits by default, MNIST idx files, a CelebA folder),
split once per study into training images and REAL held-out test images. Each
generation trains a fresh VAE on the strategy's mix with the DeepSpeed inner loop;
sampling draws latents from the prior N(0, I) and decodes them (the decoder's mean
image). `kind: ae` is the plain autoencoder of the survey's Fig. 11: no KL term, and
sampling fits a Gaussian to the training images' latents and decodes draws from it.

Rows of every corpus: `image`, the pixels of one image in [0, 1] (C·H·W float32).

Metrics, every generation: `test_loss` (reconstruction + KL per image on the real test
images; reconstruction alone for the autoencoder), `reconstruction` (binary
cross-entropy per image), and two diversity measures of the generation's samples:
`sample_distance` (mean pairwise Euclidean distance between sampled images) and
`pixel_variance` (per-pixel variance across samples, averaged over pixels).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from engine.families.base import ParamError
from engine.families.deepspeed_fit import (  # noqa: F401 — interface functions
    TrainerParams, chain_cpus, chain_gpus, placement)
from engine.families.vae.data import DIGITS, ImageDataError, load_images, split

name = "vae"
metrics = ("test_loss", "reconstruction", "sample_distance", "pixel_variance")  # headline first


@dataclass(frozen=True)
class Params(TrainerParams):
    data: str = DIGITS  # "digits", an MNIST idx3 file, or a folder of images (CelebA)
    max_images: int | None = None  # read only the first N images
    test_images: int = 300  # held-out REAL test images, fixed per study seed
    train_images: int | None = None  # T per generation (default: all not held out)
    image_size: int = 8  # images are resized to image_size × image_size
    channels: int = 1  # 1 (grey) or 3 (colour)
    widths: list | None = None  # conv channels, one stride-2 layer each (default [32, 64])
    latent: int = 16  # latent dimension (the paper: 128)
    hidden: int = 128  # width of the MLP layers between convolutions and latent
    kind: Literal["vae", "ae"] = "vae"
    epochs: float = 20.0
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    threads: int = 0  # torch threads; 0: torch default
    sample_diversity_n: int = 500  # samples the diversity metrics look at


def _widths(p: Params) -> list[int]:
    return list(p.widths) if p.widths else [32, 64]


def validate(p: Params) -> None:
    if p.channels not in (1, 3):
        raise ParamError("channels", f"must be 1 or 3, got {p.channels}")
    widths = _widths(p)
    if not all(isinstance(w, int) and w > 0 for w in widths):
        raise ParamError("widths", f"expected a list of positive integers, got {p.widths!r}")
    if p.image_size % 2 ** len(widths) or p.image_size < 2 ** len(widths):
        raise ParamError("image_size", f"must be a multiple of 2^{len(widths)} = "
                                       f"{2 ** len(widths)} (one stride-2 layer per width), "
                                       f"got {p.image_size}")
    for key, low in (("test_images", 1), ("latent", 1), ("hidden", 1), ("batch_size", 1),
                     ("sample_diversity_n", 2), ("workers", 1)):
        if getattr(p, key) < low:
            raise ParamError(key, f"must be >= {low}, got {getattr(p, key)}")
    if p.epochs <= 0 or p.lr <= 0:
        raise ParamError("epochs" if p.epochs <= 0 else "lr", "must be > 0")
    if p.data != DIGITS and "://" not in p.data and not Path(p.data).exists():
        raise ParamError("data", f"{p.data}: no such file or folder (give `digits`, an MNIST "
                                 "idx3 file, or a folder of images)")


# ------------------------------------------------------------------------ real data

@dataclass
class ImageReal:
    train: np.ndarray  # (N, C, H, W)
    test: np.ndarray
    train_chunks: list[pa.Table]
    shape: tuple[int, int, int]


def image_table(images: np.ndarray) -> pa.Table:
    flat = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1)
    return pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()),
                                                                flat.shape[1])})


def images_from_table(table: pa.Table, shape: tuple[int, int, int]) -> np.ndarray:
    flat = table.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, *shape).astype(np.float32)


def real_data(p: Params, seed: int, chunks: int, cache_dir: Path | None = None) -> ImageReal:
    try:
        images = load_images(p.data, p.image_size, p.channels, p.max_images)
    except ImageDataError as e:
        raise ImageDataError(f"family.data: {e}") from None
    train, test, T = split(images, p.data, p.test_images, p.train_images, chunks, seed,
                           "test_images", "train_images")
    return ImageReal(train=train, test=test, shape=tuple(images.shape[1:]),
                     train_chunks=[image_table(train[k * T:(k + 1) * T]) for k in range(chunks)])


# ----------------------------------------------------------------- model and loops

@dataclass
class ImageModel:
    net: object  # ConvVAE
    curve: list[tuple[int, float]]
    latent_mean: np.ndarray | None = None  # ae: the Gaussian fitted to training latents
    latent_cov: np.ndarray | None = None


def build(p: Params, shape) -> object:
    from engine.families.vae.model import ConvVAE

    return ConvVAE(shape[0], shape[1], _widths(p), p.latent, p.hidden, p.kind)


def fit(p: Params, real: ImageReal, mix: pa.Table, seed: int, workdir: Path | None = None
        ) -> ImageModel:
    """A fresh network trained on the mix by the shared DeepSpeed loop; loss = the
    negative ELBO (reconstruction + KL) per image."""
    import torch

    from engine.families.deepspeed_fit import fit_with

    images = images_from_table(mix, real.shape)
    shape = real.shape
    net, curve = fit_with(p, lambda: build(p, shape), images, _negative_elbo, seed, workdir)
    model = ImageModel(net=net, curve=curve)
    if p.kind == "ae":
        with torch.no_grad():
            z = net.encode(torch.from_numpy(images))[0].numpy().astype(np.float64)
        model.latent_mean = z.mean(axis=0)
        model.latent_cov = np.cov(z, rowvar=False) + 1e-6 * np.eye(z.shape[1])
    return model


def _negative_elbo(net, x, generator):
    recon, kl = net.losses(x, generator=generator)
    return (recon + kl).mean()


def evaluate(p: Params, real: ImageReal, model: ImageModel) -> dict[str, float]:
    import torch

    x = torch.from_numpy(real.test)
    # A fixed generator: the VAE's test loss draws one latent per image, the same
    # draw for every generation and every strategy.
    with torch.no_grad():
        recon, kl = model.net.losses(x, generator=torch.Generator().manual_seed(0))
    return {"test_loss": float((recon + kl).mean()), "reconstruction": float(recon.mean())}


def sample(p: Params, real: ImageReal, model: ImageModel, n: int, seed: int) -> pa.Table:
    import torch

    rng = np.random.default_rng(seed)
    if p.kind == "ae":
        z = rng.multivariate_normal(model.latent_mean, model.latent_cov, size=n)
    else:
        z = rng.standard_normal((n, p.latent))
    out = []
    with torch.no_grad():
        for start in range(0, n, 1024):
            out.append(model.net.decode(torch.from_numpy(z[start:start + 1024]).float()).numpy())
    return image_table(np.concatenate(out) if out else np.zeros((0, *real.shape), np.float32))


def sample_stats(p: Params, table: pa.Table) -> dict[str, float]:
    flat = table.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    images = flat.reshape(table.num_rows, -1)[:p.sample_diversity_n].astype(np.float64)
    if len(images) < 2:
        return {}
    return {"sample_distance": mean_pairwise_distance(images),
            "pixel_variance": float(images.var(axis=0).mean())}


def mean_pairwise_distance(rows: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows (a diversity measure of samples)."""
    if len(rows) < 2:
        return 0.0
    sq = (rows ** 2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0)
    return float(np.sqrt(d2[np.triu_indices(len(rows), k=1)]).mean())


def preview(p: Params, table: pa.Table) -> np.ndarray:
    """The first images of a corpus, (k, H, W) grey or (k, H, W, 3) colour, for the
    sample grids of `collapse plot`."""
    shape = (p.channels, p.image_size, p.image_size)
    images = images_from_table(table.slice(0, 16), shape)
    return images[:, 0] if p.channels == 1 else images.transpose(0, 2, 3, 1)


def save_model(model: ImageModel, directory: Path) -> None:
    """Weights, the architecture that rebuilds them, the curve, and (ae) the latent fit."""
    import json

    import torch

    net = model.net
    torch.save(net.state_dict(), directory / "net.pt")
    (directory / "model.json").write_text(json.dumps({
        "architecture": net.architecture, "curve": model.curve}))
    if model.latent_mean is not None:
        np.save(directory / "latent_mean.npy", model.latent_mean)
        np.save(directory / "latent_cov.npy", model.latent_cov)


def load_model(directory) -> ImageModel:
    import json

    import torch

    from engine.families.vae.model import ConvVAE
    from engine.files import local_copy

    directory = local_copy(directory)  # the run may live in an object store

    meta = json.loads((Path(directory) / "model.json").read_text())
    net = ConvVAE(**meta["architecture"])
    net.load_state_dict(torch.load(Path(directory) / "net.pt", weights_only=True))
    model = ImageModel(net=net.eval(), curve=[tuple(c) for c in meta["curve"]])
    if (Path(directory) / "latent_mean.npy").exists():
        model.latent_mean = np.load(Path(directory) / "latent_mean.npy")
        model.latent_cov = np.load(Path(directory) / "latent_cov.npy")
    return model


def cost(p: Params):
    from engine.plan import Cost

    # digits: 1,797 images; other data is not read for a plan (set train_images to plan it)
    rows = p.train_images or (1797 - p.test_images if p.data == DIGITS else 0)
    return Cost(rows_per_generation=rows, tokens_per_row=None, parameters=None)


def curves(model: ImageModel) -> dict[str, list[tuple[int, float]]]:
    return {"train_loss": model.curve}


def model_name(p: Params) -> str:
    return f"{p.kind}-{'x'.join(map(str, _widths(p)))}-z{p.latent}"
