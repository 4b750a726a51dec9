"""Randomness derived from names, never from global state.

Every random draw in a study comes from a seed computed from the study seed and a
path of labels (trial, generation, purpose). Re-running any piece of a chain — after
a crash, on another node — therefore draws exactly the same numbers.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np


def derive_seed(*labels: object) -> int:
    """A 63-bit seed from any JSON-serialisable labels, stable across processes and
    Python versions (unlike hash(), which is salted per process)."""
    text = json.dumps(labels, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def rng(*labels: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*labels))
