"""The diffusion family: DDPM on images and on molecular conformations (a GEOM-Drugs
pickle the test builds with RDKit), through the real chain, store and results code."""
import pickle

import numpy as np
import pytest
import torch

from engine.families.diffusion.model import ancestral_sample, random_rotations, schedule
from engine.families.images import ImageDataError
from test_families_exact import run_in_process


def test_schedule_and_rotations():
    betas, alphas, alpha_bar = schedule(50)
    assert len(betas) == 50 and torch.all(betas > 0) and torch.all(alpha_bar[1:] < alpha_bar[:-1])
    assert 0 < float(alpha_bar[-1]) < 0.1  # nearly pure noise at the last step
    R = random_rotations(100, torch.Generator().manual_seed(0))
    eye = torch.eye(3).expand(100, 3, 3)
    assert torch.allclose(R @ R.transpose(1, 2), eye, atol=1e-5)
    assert torch.allclose(torch.det(R), torch.ones(100), atol=1e-5)


def test_ancestral_sampling_is_reproducible_from_its_generator():
    from engine.families.diffusion.model import ImageEps

    net = ImageEps(1, 16, 10).eval()
    a = ancestral_sample(net, (3, 1, 8, 8), torch.Generator().manual_seed(5))
    b = ancestral_sample(net, (3, 1, 8, 8), torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (3, 1, 8, 8)


def test_diffusion_on_images_end_to_end(tmp_path):
    table = run_in_process(
        tmp_path, "{name: diffusion, test_examples: 100, train_examples: 200, width: 16, "
                  "steps: 10, epochs: 1, batch_size: 32, threads: 1}", "[replace, accumulate]", 2)
    per_gen = table[table.step.isna()]
    for metric in ("test_loss", "sample_distance", "pixel_variance", "frechet_distance",
                   "precision", "recall"):
        cells = per_gen[per_gen.metric == metric].groupby(["strategy", "generation"]).size()
        assert cells.to_dict() == {(s, g): 1 for s in ("accumulate", "replace") for g in (1, 2)}
    test_loss = per_gen[per_gen.metric == "test_loss"].set_index(["strategy", "generation"]).value
    assert (test_loss > 0).all()
    assert test_loss[("replace", 1)] == test_loss[("accumulate", 1)]  # common random numbers
    assert (tmp_path / "out" / "trials" / "replace__seed=0" / "previews" / "synthetic-0002.npy").exists()


def _geom_pickle(path, conformers: int) -> None:
    """A GEOM-Drugs style pickle: one molecule, its conformers as RDKit molecules."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("CCOC(=O)c1ccccc1"))  # ethyl benzoate, 11 heavy atoms
    ids = AllChem.EmbedMultipleConfs(mol, numConfs=conformers, randomSeed=7)
    record = {"smiles": "CCOC(=O)c1ccccc1", "conformers": [
        {"rd_mol": Chem.Mol(mol, confId=int(i)), "boltzmannweight": 1 / len(ids), "geom_id": int(i)}
        for i in ids]}
    path.write_bytes(pickle.dumps(record))


def test_geom_pickle_loader_and_point_set_diffusion(tmp_path):
    pytest.importorskip("rdkit", reason="the molecules extra is not installed")
    from engine.families.diffusion.geom import load_conformers

    geom = tmp_path / "mol.pickle"
    _geom_pickle(geom, 60)
    xyz = load_conformers(str(geom))
    assert xyz.shape[1:] == (11, 3) and len(xyz) >= 30
    assert np.allclose(xyz.mean(axis=1), 0, atol=1e-5)  # centred
    bonds = np.linalg.norm(xyz[:, 0] - xyz[:, 1], axis=1)  # the C–C bond
    assert np.allclose(bonds, 1.5, atol=0.1)
    (tmp_path / "bad.pickle").write_bytes(pickle.dumps({"atoms": []}))
    with pytest.raises(ImageDataError, match="bad.pickle: not a GEOM conformer pickle"):
        load_conformers(str(tmp_path / "bad.pickle"))

    n = len(xyz)
    table = run_in_process(
        tmp_path, "{name: diffusion, data: 'geom:%s', test_examples: 10, width: 32, steps: 20, "
                  "epochs: 5, batch_size: 8, threads: 1}" % geom, "[replace, accumulate]", 2)
    per_gen = table[table.step.isna()]
    for metric in ("test_loss", "sample_distance", "radius_of_gyration"):
        assert len(per_gen[per_gen.metric == metric]) == 4, metric
    assert "frechet_distance" not in set(per_gen.metric)  # point sets carry no labels
    assert (per_gen[per_gen.metric == "radius_of_gyration"].value > 0).all()
    from engine.corpus import CorpusStore

    store = CorpusStore(tmp_path / "out" / "trials" / "replace__seed=0" / "corpus")
    assert store.entries()["synthetic-0001"].rows == n - 10
