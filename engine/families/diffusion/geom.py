"""GEOM-Drugs conformations in their published pickle format (the `rdkit_folder`
release: one pickle per molecule, a dict whose `conformers` list holds RDKit molecules
under `rd_mol`). Needs RDKit to unpickle them: the `molecules` extra."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from engine.families.images import ImageDataError


def load_conformers(path: str, max_conformers: int | None = None) -> np.ndarray:
    """The heavy atoms' 3-D positions of every conformer of one molecule, each centred:
    (conformers, atoms, 3) float32, in Å."""
    try:
        import rdkit  # noqa: F401 — unpickling `rd_mol` needs it
    except ImportError:
        raise ImageDataError(f"{path}: GEOM pickles hold RDKit molecules; install the "
                             "molecules extra (pip install -e '.[molecules]')") from None
    if not Path(path).exists():
        raise ImageDataError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            record = pickle.load(f)
        conformers = record["conformers"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as e:
        raise ImageDataError(f"{path}: not a GEOM conformer pickle (a dict with a "
                             f"`conformers` list; {type(e).__name__}: {e})") from None
    if max_conformers is not None:
        conformers = conformers[:max_conformers]
    positions = []
    for i, c in enumerate(conformers):
        mol = c["rd_mol"]
        heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
        xyz = np.asarray(mol.GetConformer().GetPositions())[heavy]
        if positions and len(xyz) != len(positions[0]):
            raise ImageDataError(f"{path}: conformer {i} has {len(xyz)} heavy atoms, "
                                 f"conformer 0 has {len(positions[0])}")
        positions.append(xyz - xyz.mean(axis=0))
    if not positions:
        raise ImageDataError(f"{path}: no conformers")
    return np.asarray(positions, dtype=np.float32)
