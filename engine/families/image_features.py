"""Sample quality of image corpora in the feature space of a small classifier trained
on the real images (offline: no downloaded Inception weights, as FID would use).

frechet_distance  the Fréchet distance between Gaussians fitted to the features of the
                  real test images and of a generation's samples (Heusel et al. 2017's
                  FID, in this classifier's 64-d feature space): 0 for the same
                  distribution, larger as the samples drift or lose variety
precision         the share of samples inside the real features' manifold: within the
                  distance of some real image to its k-th nearest real neighbour
recall            the share of real test images inside the samples' manifold
                  (Kynkäänniemi et al. 2019, k = 3). Collapse to a few modes keeps
                  precision and loses recall.

The classifier learns the data's classes where it has them: scikit-learn's digits carry
theirs, an MNIST idx3 file takes them from the idx1 file beside it
(`…-labels-idx1-ubyte`). A folder of images (CelebA) has none: the same network then
learns to tell by how much each real image was turned (0, 90, 180 or 270 degrees;
Gidaris et al. 2018's self-supervised rotation task), which asks it to see what the
images show, and its features serve the same metrics. The two feature spaces differ, so
the numbers compare within a study (one data set), not across data sets.
"""
from __future__ import annotations

import numpy as np

K_NEIGHBOURS = 3
FEATURES = 64
MAX_EXAMPLES = 2000  # real and sampled images the metrics look at (k-NN is quadratic)
# The classifier learns from at most this many real images: enough for a feature space
# of digits, and MNIST's 60,000 (or a larger labelled set) would cost each chain
# minutes of CPU for little gain.
MAX_TRAINING = 10000


def build(channels: int, classes: int):
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(32 * 16, FEATURES), nn.ReLU(),  # the feature layer
        nn.Linear(FEATURES, classes))


def _train(channels: int, classes: int, seed: int, epochs: int, epoch_data):
    """The feature network fit to `epoch_data()`'s (images, labels) afresh each epoch:
    Adam, full passes in batches of 128, seeded (the same network in every chain)."""
    import torch

    torch.manual_seed(seed)
    net = build(channels, classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        images, labels = epoch_data()
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        y = torch.from_numpy(labels.astype(np.int64))
        for idx in torch.randperm(len(x), generator=order).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def train_classifier(images: np.ndarray, labels: np.ndarray, seed: int, epochs: int = 30):
    """The real training images' classifier (the first MAX_TRAINING of them)."""
    images, labels = images[:MAX_TRAINING], labels[:MAX_TRAINING]
    return _train(images.shape[1], int(labels.max()) + 1, seed, epochs,
                  lambda: (images, labels))


ROTATIONS = 4  # quarter turns: the self-supervised task's four classes


def rotated(images: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Each (C, H, W) image turned by its number of quarter turns (square images: a
    folder's are centre-cropped, MNIST and the digits are square)."""
    out = np.empty_like(images)
    for k in range(ROTATIONS):
        pick = turns == k
        out[pick] = np.rot90(images[pick], k, axes=(2, 3))
    return out


def train_rotation_net(images: np.ndarray, seed: int, epochs: int = 30):
    """For images without classes: the classifier's network trained to tell each real
    training image's quarter turn, one drawn afresh per image and epoch (seeded), so an
    epoch costs what the classifier's does."""
    images = images[:MAX_TRAINING]
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"image features: {images.shape[2]}×{images.shape[3]} images are "
                         "not square; the rotation task needs square images")
    draws = np.random.default_rng(seed)

    def turned():
        turns = draws.integers(ROTATIONS, size=len(images))
        return rotated(images, turns), turns

    return _train(images.shape[1], ROTATIONS, seed, epochs, turned)


def rotation_accuracy(net, images: np.ndarray, seed: int) -> float:
    """How often the rotation net tells the quarter turn of `images`, each turned by a
    seeded random one."""
    turns = np.random.default_rng(seed).integers(ROTATIONS, size=len(images))
    return accuracy(net, rotated(images, turns), turns)


def features(net, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        return np.concatenate([net[:-1](x[i:i + 1024]).double().numpy()
                               for i in range(0, len(x), 1024)])


def accuracy(net, images: np.ndarray, labels: np.ndarray) -> float:
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        return float((net(x).argmax(dim=1).numpy() == labels).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½)."""
    from scipy import linalg

    mu = a.mean(axis=0) - b.mean(axis=0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb)  # (warns when a covariance is singular: collapsed samples)
    return float(mu @ mu + np.trace(ca + cb - 2 * np.real(root)))


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    d = _distances(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NEIGHBOURS
                     ) -> tuple[float, float]:
    inside_real = (_distances(fake, real) <= _kth_radius(real, k)[None, :]).any(axis=1)
    inside_fake = (_distances(real, fake) <= _kth_radius(fake, k)[None, :]).any(axis=1)
    return float(inside_real.mean()), float(inside_fake.mean())


def sample_quality(net, real_test: np.ndarray, samples: np.ndarray) -> dict[str, float]:
    real = features(net, real_test[:MAX_EXAMPLES])
    fake = features(net, samples[:MAX_EXAMPLES])
    precision, recall = precision_recall(real, fake)
    return {"frechet_distance": frechet_distance(real, fake), "precision": precision,
            "recall": recall}
