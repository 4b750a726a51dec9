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
`pixel_variance` (per-pixel variance across samples, averaged over pixels); and
`frechet_distance`, `precision` and `recall` of the samples against the real test images
in a small classifier's feature space (engine/families/image_features.py: the data's
classes where it has them, digits and MNIST; each image's quarter turn otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa

from engine.families.arrays import (ArrayFamily, NetModel, RealLabels, TrainerConfig, batched,
                                    image_diversity, image_preview, image_table,
                                    rows_from_table)
from engine.families.base import (ParamError, Presentation, later_fits, row_weights,
                                  truncation_threshold)
from engine.families.images import DIGITS, ImageDataError, load_images, split, split_labels
from engine.files import is_remote


@dataclass
class ImageReal:
    train: np.ndarray  # (N, C, H, W)
    test: np.ndarray
    train_chunks: list[pa.Table]
    shape: tuple[int, int, int]
    labels: RealLabels | None = None  # for the feature-space metrics (ArrayFamily.compare)


class NegativeELBO:
    """The VAE's training loss: reconstruction + KL per image, averaged over the batch
    (`model` calls the network's forward, which returns the two terms per image), each
    image times its weight in a weighted mix. `threshold` γ: the reconstruction's
    cross-entropy truncated pixel by pixel (ForTIFAI; ConvVAE.losses). A class, not a
    closure: Ray Train pickles it to its workers."""

    def __init__(self, threshold: float | None = None):
        self.threshold = threshold

    def __call__(self, model, batch, generator):
        from engine.fit import split_weights, weighted_mean

        x, weights = split_weights(batch)
        recon, kl = model(x, generator, self.threshold)
        return weighted_mean(recon + kl, weights)


class VAE(ArrayFamily):
    name = "vae"
    weighted_fit = True  # a weighted mix's image weights (NegativeELBO)
    metrics = ("test_loss", "reconstruction", "sample_distance", "pixel_variance",
               "frechet_distance", "precision", "recall")  # headline first
    presentation = Presentation(previews=lambda family, table: image_preview(
        table, family.config.channels, family.config.image_size))
    path_fields = ("data",)
    path_keywords = (DIGITS,)
    kind: ClassVar[str] = "vae"  # the network's kind: "vae", or "ae" (no KL, no noise)

    @dataclass(frozen=True)
    class Config(TrainerConfig):
        data: str = DIGITS  # "digits", an MNIST idx3 file (path or URI), or a folder of images
        max_images: int | None = None  # read only the first N images
        test_images: int = 300  # held-out REAL test images, fixed per study seed
        train_images: int | None = None  # T per generation (default: all not held out)
        image_size: int = 8  # images are resized to image_size × image_size
        channels: int = 1  # 1 (grey) or 3 (colour)
        widths: list | None = None  # conv channels, one stride-2 layer each (default [32, 64])
        latent: int = 16  # latent dimension (the paper: 128)
        hidden: int = 128  # width of the MLP layers between convolutions and latent
        epochs: float = 20.0  # passes over the mix per generation
        batch_size: int = 64  # images per step per worker
        lr: float = 2e-3  # peak learning rate (AdamW, warmup then cosine decay)
        weight_decay: float = 0.0  # AdamW's decoupled weight decay
        sample_diversity_n: int = 500  # samples the diversity metrics look at
        loss: dict | None = later_fits(None)  # the loss from generation 2 on (generation 1, real data alone, stays shared): null, the negative ELBO; {name: truncated_ce, threshold: γ}: pixels the decoder already reconstructs with likelihood above γ add no loss (Shabgahi et al. 2025, ForTIFAI)

    def _widths(self) -> list[int]:
        return list(self.config.widths) if self.config.widths else [32, 64]

    def validate(self) -> None:
        p = self.config
        if p.channels not in (1, 3):
            raise ParamError("channels", f"must be 1 or 3, got {p.channels}")
        widths = self._widths()
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
        truncation_threshold(p.loss)  # ParamError naming `loss` if the fit does not know it
        if p.epochs <= 0 or p.lr <= 0:
            raise ParamError("epochs" if p.epochs <= 0 else "lr", "must be > 0")
        if p.data != DIGITS and not is_remote(p.data) and not Path(p.data).exists():
            raise ParamError("data", f"{p.data}: no such file or folder (give `digits`, an MNIST "
                                     "idx3 file, or a folder of images)")

    # ------------------------------------------------------------------ real data
    def real_data(self, seed: int, chunks: int, cache_dir: Path | None = None) -> ImageReal:
        p = self.config
        try:
            images = load_images(p.data, p.image_size, p.channels, p.max_images)
        except ImageDataError as e:
            raise ImageDataError(f"family.data: {e}") from None
        train, test, T = split(images, p.data, p.test_images, p.train_images, chunks, seed,
                               "test_images", "train_images")
        return ImageReal(train=train, test=test, shape=tuple(images.shape[1:]),
                         train_chunks=[image_table(train[k * T:(k + 1) * T])
                                       for k in range(chunks)],
                         labels=split_labels(p.data, p.max_images, len(images), p.test_images,
                                             p.train_images, chunks, seed))

    # -------------------------------------------------------------- model and loops
    def network(self, architecture: dict):
        from engine.families.vae.model import ConvVAE

        return ConvVAE(**architecture)

    def fit(self, real: ImageReal, mix: pa.Table, seed: int, context) -> NetModel:
        """A fresh network trained on the mix by engine.fit's loop; loss = the negative
        ELBO (reconstruction + KL) per image."""
        p = self.config
        images = rows_from_table(mix, "image", real.shape)
        architecture = {"channels": real.shape[0], "image_size": real.shape[1],
                        "widths": self._widths(), "latent": p.latent, "hidden": p.hidden,
                        "kind": self.kind}
        # `loss` is read by the fits after generation 1 only (its role, later_fits)
        later = getattr(context, "previous_model", None) is not None
        loss = NegativeELBO(truncation_threshold(p.loss) if later else None)
        return self.fit_network(_Build(self, architecture), images, loss, seed, context,
                                weights=row_weights(mix))

    def evaluate(self, real: ImageReal, model: NetModel) -> dict[str, float]:
        from engine.fit import run_on_gpu

        return run_on_gpu(self.evaluation_gpus(), self.config.cpus_per_worker, _vae_scores,
                          real.test, model.net)

    def sample(self, real: ImageReal, model: NetModel, n: int, seed: int) -> pa.Table:
        """Latents drawn here (seeded), decoded where the study's GPUs are (a GPU Ray
        reserved, engine/fit/device.py)."""
        from engine.fit import run_on_gpu

        z = self._latents(np.random.default_rng(seed), model, n)
        images = run_on_gpu(self.evaluation_gpus(), self.config.cpus_per_worker, _decode,
                            model.net, z)
        return image_table(images if n else np.zeros((0, *real.shape), np.float32))

    def _latents(self, rng: np.random.Generator, model: NetModel, n: int) -> np.ndarray:
        """Latents to decode: the VAE's prior N(0, I)."""
        return rng.standard_normal((n, self.config.latent))

    def sample_stats(self, table: pa.Table) -> dict[str, float]:
        return image_diversity(table, self.config.sample_diversity_n)

    def cost(self):
        from engine.plan import Cost

        p = self.config
        # digits: 1,797 images; other data is not read for a plan (set train_images to plan it)
        real = 1797 - p.test_images if p.data == DIGITS else None
        return Cost(rows_per_generation=p.train_images or real or 0, tokens_per_row=None,
                    parameters=None, real_rows=real, rows_field="train_images")

    def model_name(self) -> str:
        return f"{self.kind}-{'x'.join(map(str, self._widths()))}-z{self.config.latent}"


class _Build:
    """The network factory a fit ships to its workers (picklable)."""

    def __init__(self, family: ArrayFamily, architecture: dict):
        self.family, self.architecture = family, architecture

    def __call__(self):
        return self.family.network(self.architecture)


def _decode(net, z: np.ndarray) -> np.ndarray:
    """Images from latents, on this process's device, 1,024 at a time."""
    import torch

    from engine.fit import current_device

    device = current_device()
    net = net.to(device).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(z), 1024):
            batch = torch.from_numpy(z[start:start + 1024]).float().to(device)
            out.append(net.decode(batch).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _vae_scores(test: np.ndarray, net) -> dict[str, float]:
    """Negative ELBO and reconstruction per REAL test image, on this process's device.
    A fixed generator: the latent drawn for each image is the same for every generation
    and every strategy."""
    import torch

    from engine.fit import current_device

    device = current_device()
    net = net.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    recon, kl = [], []
    with torch.no_grad():
        for rows in batched(len(test)):
            r, k = net.losses(torch.from_numpy(test[rows]).to(device), generator=generator)
            recon.append(r.cpu())
            kl.append(k.cpu())
    recon, kl = torch.cat(recon), torch.cat(kl)
    return {"test_loss": float((recon + kl).mean()), "reconstruction": float(recon.mean())}


class Autoencoder(VAE):
    """The plain autoencoder (the survey's Fig. 11): the VAE's network without the KL
    term or the noise; sampling fits a Gaussian to the training images' latents and
    decodes draws from it."""

    name = "ae"
    kind = "ae"

    def fit(self, real: ImageReal, mix: pa.Table, seed: int, context) -> NetModel:
        import torch

        model = super().fit(real, mix, seed, context)
        images = rows_from_table(mix, "image", real.shape)
        with torch.no_grad():
            z = model.net.encode(torch.from_numpy(images))[0].numpy().astype(np.float64)
        weights = row_weights(mix)  # a weighted mix's: the latent Gaussian is fit weighted too
        model.arrays["latent_mean"] = np.average(z, axis=0, weights=weights)
        model.arrays["latent_cov"] = np.cov(z, rowvar=False, aweights=weights) \
            + 1e-6 * np.eye(z.shape[1])
        return model

    def _latents(self, rng: np.random.Generator, model: NetModel, n: int) -> np.ndarray:
        return rng.multivariate_normal(model.arrays["latent_mean"], model.arrays["latent_cov"],
                                       size=n)
