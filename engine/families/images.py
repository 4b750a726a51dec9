"""Image data for the image families (vae, ae, diffusion): arrays of shape (N, C, H, W),
float32 in [0, 1], and the seeded test/train split every array family uses.

- `digits`: the 1,797 handwritten-digit scans (8×8, grey) that ship inside
  scikit-learn — real images, no download, so image studies run on a fresh machine;
- an MNIST idx file (`*-images-idx3-ubyte`, optionally .gz), from a path or a URI;
- a folder of images (CelebA's aligned JPEGs): each centre-cropped to a square and
  resized to the study's size.

Every bad input names the file: a missing folder, an unreadable image, mixed sizes.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from engine.errors import CollapseError
from engine.files import open_source, split_uri

DIGITS = "digits"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageDataError(CollapseError, ValueError):
    pass


def load_images(source: str, image_size: int, channels: int, max_images: int | None = None,
                ) -> np.ndarray:
    """The images of `source`, as (N, channels, image_size, image_size) in [0, 1]."""
    if source == DIGITS:
        images = _digits()
    elif "idx3-ubyte" in Path(split_uri(source)[1]).name:
        images = _mnist_idx(source, max_images)
    else:
        images = _folder(source, image_size, channels, max_images)
    if max_images is not None:
        images = images[:max_images]
    images = _to_channels(images, channels)
    if images.shape[-1] != image_size:
        images = _resize(images, image_size)
    return np.ascontiguousarray(images, dtype=np.float32)


def load_labels(source: str, max_images: int | None = None) -> np.ndarray | None:
    """The class of each image of `source`, in load_images' order, where the source has
    them: the digits' own; for an MNIST idx3 file, the idx1 file beside it
    (`train-images-idx3-ubyte` → `train-labels-idx1-ubyte`); None otherwise."""
    if source == DIGITS:
        from sklearn.datasets import load_digits

        labels = load_digits().target
    elif "idx3-ubyte" in Path(split_uri(source)[1]).name:
        beside = source.replace("images-idx3-ubyte", "labels-idx1-ubyte")
        try:
            with open_source(beside) as raw:
                data = raw.read()
        except FileNotFoundError:
            return None
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        magic, n = struct.unpack(">II", data[:8])
        if magic != 2049:
            raise ImageDataError(f"{beside}: not an idx1 label file (magic {magic}, "
                                 "expected 2049)")
        labels = np.frombuffer(data, dtype=np.uint8, count=n, offset=8)
    else:
        return None
    return np.asarray(labels[:max_images] if max_images is not None else labels, np.int64)


def split_labels(source: str, max_images: int | None, n_examples: int, test_n: int,
                 train_n: int | None, chunks: int, seed: int):
    """The data's labels split as `split` splits its examples (the same seeded
    permutation), as engine.families.arrays.RealLabels; None where it has none."""
    from engine.families.arrays import RealLabels

    labels = load_labels(source, max_images)
    if labels is None or len(labels) != n_examples:
        return None
    train, test, _ = split(labels, source, test_n, train_n, chunks, seed, "", "")
    return RealLabels(train=train, test=test, seed=seed)


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0)[:, None, :, :]  # (1797, 1, 8, 8)


def _mnist_idx(source: str, max_images: int | None) -> np.ndarray:
    """MNIST's idx3 format: magic 2051, count, rows, cols (big-endian), then pixels."""
    try:
        with open_source(source) as raw:
            data = raw.read()
    except FileNotFoundError:
        raise ImageDataError(f"{source}: no such file") from None
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 16:
        raise ImageDataError(f"{source}: not an idx3 image file (only {len(data)} bytes)")
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        raise ImageDataError(f"{source}: not an idx3 image file (magic {magic}, expected 2051)")
    if len(data) < 16 + n * rows * cols:
        raise ImageDataError(f"{source}: truncated: header says {n} images of {rows}×{cols}, "
                             f"the file holds {len(data) - 16} pixel bytes")
    n = n if max_images is None else min(n, max_images)
    pixels = np.frombuffer(data, dtype=np.uint8, count=n * rows * cols, offset=16)
    return pixels.reshape(n, 1, rows, cols) / 255.0


def _folder(source: str, image_size: int, channels: int, max_images: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    root = Path(source)
    if not root.is_dir():
        raise ImageDataError(f"{source}: no such image folder (give a folder of images, an "
                             "MNIST idx3 file, or `digits`)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageDataError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    if max_images is not None:
        files = files[:max_images]
    images, first_size = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                if first_size is None:
                    first_size = im.size
                elif im.size != first_size:
                    raise ImageDataError(
                        f"{f}: {im.size[0]}×{im.size[1]} pixels, but {files[0].name} is "
                        f"{first_size[0]}×{first_size[1]}: a folder must hold images of one "
                        "size (CelebA's aligned crops are all 178×218)")
                im = im.convert("L" if channels == 1 else "RGB")
                images.append(np.asarray(_centre_square(im).resize(
                    (image_size, image_size), Image.BILINEAR), dtype=np.float32) / 255.0)
        except (UnidentifiedImageError, OSError) as e:
            raise ImageDataError(f"{f}: unreadable image ({e})") from None
    stacked = np.stack(images)
    return stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)


def _centre_square(im):
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return np.repeat(images, channels, axis=1)
    return images.mean(axis=1, keepdims=True)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        out = F.interpolate(torch.from_numpy(np.asarray(images, dtype=np.float32)),
                            size=(size, size), mode="bilinear", align_corners=False)
    return out.clamp(0, 1).numpy()


def write_idx(path: Path, images: np.ndarray) -> None:
    """Write (N, H, W) uint8 images in MNIST's idx3 format (tests build tiny files)."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 2051, n, rows, cols) +
                     np.asarray(images, dtype=np.uint8).tobytes())


def split(examples: np.ndarray, source: str, test_n: int, train_n: int | None, chunks: int,
          seed: int, test_field: str, train_field: str) -> tuple[np.ndarray, np.ndarray, int]:
    """A seeded test/train split, fixed per study seed, and T, the examples per real
    chunk: (train, test, T). Errors name the study field to change."""
    if len(examples) <= test_n:
        raise ImageDataError(f"family.{test_field}: {source} has {len(examples)} examples, "
                             f"not more than {test_field} = {test_n}")
    order = np.random.default_rng(seed).permutation(len(examples))
    test, train = examples[order[:test_n]], examples[order[test_n:]]
    # T is stated or all the training split; never shrunk to make room for the fresh
    # real chunks a strategy reads (that would change T for that strategy alone).
    T = train_n or len(train)
    if chunks * T > len(train):
        raise ImageDataError(f"family.{train_field}: {chunks} real chunk(s) of T = {T} need "
                             f"{chunks * T} training examples; the data has {len(train)}: "
                             f"set {train_field} to at most {len(train) // chunks} (a strategy "
                             "that reads fresh real data needs a chunk per generation)")
    return train, test, T
