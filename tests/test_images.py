"""The image families (vae, ae): loaders on files the tests write, bad input, and tiny
chains end to end through the same chain, store and results code as every family."""
import gzip
import struct

import numpy as np
import pytest

from conftest import collapse, write_study
from engine.families.images import ImageDataError, load_images, write_idx
from test_families_exact import run_in_process


def test_digits_are_the_real_scans_that_ship_with_scikit_learn():
    images = load_images("digits", 8, 1)
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    assert load_images("digits", 16, 3, max_images=5).shape == (5, 3, 16, 16)


def test_mnist_idx_files_plain_and_gzipped(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", raw)
    images = load_images(str(tmp_path / "t10k-images-idx3-ubyte"), 28, 1)
    assert images.shape == (7, 1, 28, 28)
    np.testing.assert_allclose(images[:, 0], raw / 255.0, atol=1e-6)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress((tmp_path / "t10k-images-idx3-ubyte").read_bytes()))
    assert load_images(str(gz), 28, 1, max_images=3).shape == (3, 1, 28, 28)
    assert load_images(f"file://{gz}", 14, 1).shape == (7, 1, 14, 14)  # a URI, resized
    # labels: the idx1 file beside the images (magic 2049, count, then one byte each)
    from engine.families.images import load_labels

    assert load_labels(str(tmp_path / "t10k-images-idx3-ubyte")) is None  # none beside
    classes = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, 7) + classes.tobytes())
    assert load_labels(str(tmp_path / "t10k-images-idx3-ubyte")).tolist() == classes.tolist()
    assert load_labels(str(tmp_path / "t10k-images-idx3-ubyte"), 3).tolist() == [3, 1, 4]


def test_image_folder_is_centre_cropped_and_resized(tmp_path):
    from PIL import Image

    folder = tmp_path / "celeba"
    folder.mkdir()
    for i in range(3):
        # 30 wide, 40 tall: a white band in the centre square, black outside it
        a = np.zeros((40, 30, 3), dtype=np.uint8)
        a[5:35, :, :] = 255
        Image.fromarray(a).save(folder / f"{i:06d}.jpg", quality=100)
    images = load_images(str(folder), 16, 3)
    assert images.shape == (3, 3, 16, 16)
    assert images.min() > 0.9  # the crop kept only the white centre square


def test_bad_image_input_names_the_file(tmp_path):
    from PIL import Image

    with pytest.raises(ImageDataError, match="no such image folder"):
        load_images(str(tmp_path / "missing"), 8, 1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(mixed / "b.png")
    with pytest.raises(ImageDataError, match=r"b\.png: 10×12 pixels, but a\.png is 10×10"):
        load_images(str(mixed), 8, 1)
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(broken / "a.png")
    (broken / "b.png").write_bytes(b"not an image")
    with pytest.raises(ImageDataError, match=r"b\.png: unreadable image"):
        load_images(str(broken), 8, 1)
    (tmp_path / "x-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 12)
    with pytest.raises(ImageDataError, match="x-images-idx3-ubyte: not an idx3 image file"):
        load_images(str(tmp_path / "x-images-idx3-ubyte"), 8, 1)


def test_a_missing_image_folder_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    study = write_study(tmp_path / "s.yaml", f"""\
name: v
family: {{name: vae, data: {tmp_path / 'nowhere'}}}
strategies: [replace]
generations: 1
seeds: [0]
out: {out}
""")
    r = collapse("run", study)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"{study}: family.data: {tmp_path / 'nowhere'}: no such file or folder (give `digits`, "
        "an MNIST idx3 file, or a folder of images)")
    assert not out.exists()


TINY = "{name: %s, test_images: 200, train_images: 300, widths: [8, 16], latent: 4, hidden: 32, epochs: 4, batch_size: 32, threads: 1}"


@pytest.mark.parametrize("family", ["vae", "ae"])
def test_image_family_chain_end_to_end(tmp_path, family):
    table = run_in_process(tmp_path, TINY % family, "[replace, accumulate]", 2)
    per_gen = table[table.step.isna()]
    for metric in ("test_loss", "reconstruction", "sample_distance", "pixel_variance",
                   "frechet_distance", "precision", "recall"):
        cells = per_gen[per_gen.metric == metric].groupby(["strategy", "generation"]).size()
        assert cells.to_dict() == {(s, g): 1 for s in ("accumulate", "replace") for g in (1, 2)}
    # the samples' feature-space distance to the real test images: measured, positive
    assert (per_gen[per_gen.metric == "frechet_distance"].value > 0).all()
    assert per_gen[per_gen.metric.isin(["precision", "recall"])].value.between(0, 1).all()
    test_loss = per_gen[per_gen.metric == "test_loss"].set_index(["strategy", "generation"]).value
    assert test_loss[("replace", 1)] == test_loss[("accumulate", 1)]  # common random numbers
    assert (table[table.metric == "train_loss"].step.notna()).all()
    if family == "ae":  # no KL: the test loss is the reconstruction error
        recon = per_gen[per_gen.metric == "reconstruction"].set_index(["strategy", "generation"]).value
        assert np.allclose(test_loss.sort_index(), recon.sort_index())
    # the sample grids of `collapse plot`
    from engine.results import plot_samples

    paths = plot_samples(tmp_path / "out", tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["samples_accumulate__seed=0.png",
                                             "samples_replace__seed=0.png"]
    previews = np.load(tmp_path / "out" / "trials" / "replace__seed=0" / "previews" /
                       "synthetic-0002.npy")
    assert previews.shape == (16, 8, 8) and 0 <= previews.min() and previews.max() <= 1


@pytest.mark.slow
@pytest.mark.heavy  # (~1 min; the LM study in the default suite fits on Ray Train)
def test_image_fit_on_ray_train_workers(tmp_path, ray_local):
    """`trainer: ray`: the same DeepSpeed loop on two Ray Train workers, each on its half
    of the mix, gradients averaged; the chain gets the trained network back."""
    family = TINY.replace("threads: 1}", "threads: 1, trainer: ray, workers: 2, cpus_per_worker: 0.5}")
    table = run_in_process(tmp_path, family % "vae", "[replace]", 2)
    per_gen = table[table.step.isna()]
    assert sorted(per_gen[per_gen.metric == "test_loss"].generation) == [1, 2]
    assert (per_gen[per_gen.metric == "test_loss"].value > 0).all()
    assert (table[table.metric == "train_loss"].step.notna()).all()
    # two workers over 300 images, batches of 32: 4 steps an epoch each, 16 in all
    steps = table[(table.metric == "train_loss") & (table.generation == 1)].step
    assert steps.max() == 16


def test_a_list_valued_axis_is_a_column_the_table_groups_and_pivots(tmp_path):
    """`widths: [[8, 16], null]` is a grid axis of two conv stacks (null: the default):
    its table column holds each value as the trial id writes it, and the pivot,
    summary, profile and plots group by it (a list in a cell would be unhashable, and
    a None one a NaN that every pivot drops)."""
    from engine import results

    family = TINY.replace("widths: [8, 16]", "widths: [[8, 16], null]") % "ae"
    table = run_in_process(tmp_path, family, "[replace]", 2)
    assert sorted(table.widths.unique()) == ["None", "[8, 16]"]
    assert sorted(table.trial.unique()) == ["replace__widths=None__seed=0",
                                            "replace__widths=[8, 16]__seed=0"]
    pivot = results.pivot(table, "test_loss")
    assert list(pivot.columns) == [1, 2] and len(pivot) == 2
    assert pivot.notna().all().all()
    assert len(results.summary(table)) == 2
    results.write(table, tmp_path / "out")  # Parquet keeps the strings
    assert results.load_results(tmp_path / "out").widths.tolist() == table.widths.tolist()
    assert results.plot(table, tmp_path / "plots")


def test_the_last_generation_samples_only_when_asked_and_an_extension_fills_it_in(tmp_path):
    """sample_last: false (the default) stores no corpus for the last generation, whose
    samples would train nothing; extending the study samples it then, and the table
    equals that of a study run this long from the start."""
    from engine import results
    from engine.chain import run_chain
    from engine.spec import load_study

    family = TINY % "vae"
    short = run_in_process(tmp_path / "a", family, "[replace]", 2, sample_last=False)
    per_gen = short[short.step.isna()]
    assert sorted(per_gen[per_gen.metric == "sample_distance"].generation) == [1]
    chain = tmp_path / "a" / "out" / "trials" / "replace__seed=0"
    assert not (chain / "corpus" / "synthetic-0002").exists()

    study = load_study(tmp_path / "a" / "s.yaml", ["generations=3"])
    run_chain(study.trials()[0], 3, study.out)
    extended = results.collect(study)
    reference = run_in_process(tmp_path / "b", family, "[replace]", 3, sample_last=False)
    key = ["generation", "metric", "step"]
    a = extended.drop(columns="study").sort_values(key).reset_index(drop=True)
    b = reference.drop(columns="study").sort_values(key).reset_index(drop=True)
    import pandas as pd

    pd.testing.assert_frame_equal(a, b)
    assert sorted(a[(a.metric == "sample_distance")].generation) == [1, 2]


def test_warm_start_trains_each_generation_from_the_previous_generations_network(tmp_path):
    """start: warm (Bertrand et al. 2024) for the array families: generation 2 begins
    from generation 1's network (its first training loss on the synthetic mix below a
    fresh network's: 43.5 against 50.2 here), and generation 1 is the scratch chain's,
    shared."""
    family = TINY.replace("threads: 1}", "threads: 1, start: [scratch, warm]}")
    table = run_in_process(tmp_path, family % "vae", "[replace]", 2, sample_last=False)
    curve = table[table.metric == "train_loss"].sort_values("step")
    first = curve.groupby(["start", "generation"]).value.first()
    last = curve.groupby(["start", "generation"]).value.last()
    assert first[("warm", 1)] == first[("scratch", 1)]  # one shared generation 1
    assert first[("warm", 2)] < 0.95 * first[("scratch", 2)]
    assert last[("warm", 1)] == last[("scratch", 1)]
    # `start` is read by the later fits alone: one generation-1 corpus, sampled once
    samples = table[(table.metric == "frechet_distance") & (table.generation == 1)]
    assert samples.value.nunique() == 1 and len(samples) == 2
    log = (tmp_path / "out" / "trials" / "replace__start=warm__seed=0" / "chain.log").read_text()
    assert "warm start from" in log


def _tells_real_from_noise_and_a_collapse(net, test, train, noise_recall):
    from engine.families import image_features as F

    real = F.sample_quality(net, test, train)  # real training images as the "samples"
    noise = F.sample_quality(net, test, np.random.default_rng(1).random(train.shape))
    # collapse to five modes: copies of five real images
    collapsed = F.sample_quality(net, test, np.repeat(train[:5], len(train) // 5, axis=0))
    assert real["frechet_distance"] < noise["frechet_distance"] / 10, (real, noise)
    assert real["frechet_distance"] < collapsed["frechet_distance"] / 3, (real, collapsed)
    assert real["precision"] > 0.7 and real["recall"] > 0.7, real
    assert noise["precision"] < 0.3 and noise["recall"] < noise_recall, noise
    assert collapsed["precision"] > 0.5 and collapsed["recall"] < 0.2, collapsed


def test_feature_space_metrics_tell_real_from_noise_and_a_collapse():
    """Fréchet distance, precision and recall in the feature space of a classifier
    trained on the real digits (engine/families/image_features.py)."""
    from engine.families import image_features as F
    from engine.families.images import DIGITS, load_images, split_labels

    images = load_images(DIGITS, 8, 1)
    labels = split_labels(DIGITS, None, len(images), 300, None, 1, seed=0)
    order = np.random.default_rng(0).permutation(len(images))  # as split() orders them
    test, train = images[order[:300]], images[order[300:]]
    net = F.train_classifier(train, labels.train, seed=0)
    assert F.accuracy(net, test, labels.test) > 0.9  # labels aligned with the images
    _tells_real_from_noise_and_a_collapse(net, test, train, noise_recall=0.1)
    # Fréchet distance of a set to itself: 0
    feats = F.features(net, test)
    assert abs(F.frechet_distance(feats, feats)) < 1e-6


def test_images_without_classes_get_the_metrics_in_a_rotation_nets_feature_space():
    """A folder of images has no classes: the network learns each real image's quarter
    turn instead (self-supervised), and its features tell real from noise and a collapse
    as the classifier's do."""
    from engine.families import image_features as F
    from engine.families.images import DIGITS, load_images

    images = load_images(DIGITS, 8, 1)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = images[order[:300]], images[order[300:]]
    turns = np.array([0, 1, 2, 3])
    assert np.array_equal(F.rotated(test[:4], turns)[1], np.rot90(test[1], 1, axes=(1, 2)))
    net = F.train_rotation_net(train, seed=0)
    assert F.rotation_accuracy(net, test, seed=1) > 0.8  # it learned the task (chance: 0.25)
    _tells_real_from_noise_and_a_collapse(net, test, train, noise_recall=0.2)
    with pytest.raises(ValueError, match="8×6 images are not square"):
        F.train_rotation_net(train[:, :, :, :6], seed=0)


def test_a_folder_of_images_gets_the_feature_space_metrics(tmp_path, caplog):
    from PIL import Image

    from engine.families.images import DIGITS, load_images

    folder = tmp_path / "digit-pngs"
    folder.mkdir()
    for i, image in enumerate(load_images(DIGITS, 8, 1)[:600]):
        Image.fromarray((image[0] * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")
    family = TINY.replace("name: %s", f"name: vae, data: {folder}")
    with caplog.at_level("WARNING"):
        table = run_in_process(tmp_path, family, "[replace]", 2)
    assert "to tell each image's quarter turn (the data has no classes)" in caplog.text
    per_gen = table[table.step.isna()]
    fd = per_gen[per_gen.metric == "frechet_distance"].set_index("generation").value
    assert sorted(fd.index) == [1, 2] and (fd > 0).all()
    assert per_gen[per_gen.metric.isin(["precision", "recall"])].value.between(0, 1).all()


def test_loss_weights_steer_a_vae_chain_toward_the_kind_they_favour(tmp_path):
    """A workflow's `weights` in a neural family: each generation trains on 300 fresh
    real digits and 300 samples of the previous VAE; weighting the real images alone
    keeps the test loss at or below generation 1's, weighting the samples alone lets it
    grow (as under replace), and equal weights fall between. Measured 2026-12-03:
    31.0, 32.3 (equal), 39.8 against 36.7 at generation 1."""
    workflows = ", ".join(
        f"{{name: {name}, real: {{fraction: 1.0}}, real_data: fresh, synthetic: {{rows: 300}}, "
        f"weights: {{real: {w}, synthetic: {1 - w}}}}}"
        for name, w in (("real_weighted", 1.0), ("equal", 0.5), ("synthetic_weighted", 0.0)))
    table = run_in_process(tmp_path, TINY % "vae", f"[{workflows}]", 2, sample_last=False)
    loss = table[(table.metric == "test_loss") & table.step.isna()].set_index(
        ["strategy", "generation"]).value
    first = loss[("real_weighted", 1)]
    assert loss[("equal", 1)] == first == loss[("synthetic_weighted", 1)]  # one shared gen 1
    assert loss[("real_weighted", 2)] < loss[("equal", 2)] < loss[("synthetic_weighted", 2)], loss
    assert loss[("real_weighted", 2)] <= first < loss[("synthetic_weighted", 2)], loss


def test_image_losses_weigh_each_example_and_truncate_confident_pixels():
    """The VAE's loss (NegativeELBO) and the diffusion loss (L_simple) take a weighted
    mix's (images, weights) batches: the mean of each image's loss times its weight, so
    weight 1 everywhere is the plain loss. Truncated cross-entropy on the VAE's
    reconstruction drops the pixels the decoder already gives likelihood above γ."""
    import torch

    from engine.families.diffusion import _LSimple
    from engine.families.diffusion.model import build, eps_losses, schedule
    from engine.families.vae import NegativeELBO
    from engine.families.vae.model import ConvVAE

    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8).round()  # binary pixels: a likelihood near 1 is reachable
    w = torch.tensor([2.0, 0.0, 1.0, 1.0, 0.0, 2.0])
    vae = ConvVAE(1, 8, [8, 16], 4, 32)
    diffusion = build({"kind": "images", "channels": 1, "width": 8, "steps": 20})
    cases = ((NegativeELBO(), vae, lambda g: sum(vae.losses(x, g))),
             (_LSimple(steps=20, rotate=False), diffusion,
              lambda g: eps_losses(diffusion, x, g, schedule(20)[2])))
    for loss, net, per_example in cases:
        draw = lambda: torch.Generator().manual_seed(3)  # the same noise for each call
        plain = loss(net, x, draw()).item()
        assert loss(net, (x, torch.ones(6)), draw()).item() == pytest.approx(plain, rel=1e-5)
        expected = float((per_example(draw()) * w).mean())
        assert loss(net, (x, w), draw()).item() == pytest.approx(expected, rel=1e-5)
        assert expected != pytest.approx(plain, rel=1e-3)
    vae.eval()  # batch norm from its running statistics: one image's loss is its own
    recon, _ = vae.losses(x, torch.Generator().manual_seed(1))
    truncated, _ = vae.losses(x, torch.Generator().manual_seed(1), threshold=0.5)
    assert (truncated < recon).all() and (truncated > 0).all()
    assert torch.allclose(vae.losses(x, torch.Generator().manual_seed(1), threshold=1.0)[0],
                          recon)  # γ = 1: nothing dropped
    assert NegativeELBO(0.5)(vae, x, torch.Generator().manual_seed(1)).item() < \
        NegativeELBO()(vae, x, torch.Generator().manual_seed(1)).item()


def test_truncated_cross_entropy_in_a_vae_chain_starts_at_generation_2(tmp_path):
    """`loss` is read by the fits after generation 1 (role later_fits): one generation-1
    model and corpus for both chains; at generation 2 the truncated chain's training
    loss, which leaves out the pixels already reconstructed above γ, runs below the
    plain one's, and its model differs."""
    family = TINY.replace("threads: 1}", "threads: 1, loss: [null, {name: truncated_ce, "
                                         "threshold: 0.5}]}")
    table = run_in_process(tmp_path, family % "vae", "[replace]", 2, sample_last=False)
    per_gen = table[table.step.isna()].pivot_table(index=["loss", "generation"],
                                                   columns="metric", values="value")
    tce = "name:truncated_ce,threshold:0.5"
    for metric in ("test_loss", "frechet_distance"):  # one model, one corpus
        assert per_gen.loc[(tce, 1), metric] == per_gen.loc[("None", 1), metric]
    assert per_gen.loc[(tce, 2), "test_loss"] != per_gen.loc[("None", 2), "test_loss"]
    curve = table[(table.metric == "train_loss") & (table.generation == 2)]
    last = curve.sort_values("step").groupby("loss").value.last()
    assert last[tce] < 0.8 * last["None"], last
