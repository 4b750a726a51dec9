"""engine.fit on its own: the one DeepSpeed loop (seeded, checkpointed, exactly
resumable), the device rule, and ZeRO-3 weights gathered before a model is saved."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from engine.fit import LoopConfig, current_device, resolve_precision, train


class _Noisy(torch.nn.Module):
    """A loss that draws noise from the loop's generator, as the VAE and diffusion losses
    do: a resumed fit must restore the generator too."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def forward(self, x, generator):
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        return (self.layer((x + noise).to(self.layer.weight.dtype)) ** 2).float().mean()


def _loss(engine, batch, generator):
    assert batch.device == engine.device == current_device()  # the loop moved it there
    return engine(batch, generator)


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, generator=g) for _ in range(n)]


def test_the_device_is_where_the_process_runs():
    device = current_device()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: kept


def test_a_fit_is_seeded_and_resumes_exactly_from_its_checkpoint(tmp_path):
    cfg = LoopConfig(steps=10, batch_size=8, lr=1e-2, seed=3, log_every=2)
    whole = train(_Noisy, _batches(10), _loss, cfg)
    again = train(_Noisy, _batches(10), _loss, cfg)
    assert whole.curve == again.curve and len(whole.curve) == 5  # seeded

    def stop_at_6(step, curve, save):
        if step == 6:
            save(str(tmp_path / "ckpt"))
            raise KeyboardInterrupt  # the worker dies right after its checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(_Noisy, _batches(10), _loss, cfg, on_step=stop_at_6)
    resumed = train(_Noisy, _batches(10)[6:], _loss, cfg, resume_from=str(tmp_path / "ckpt"))
    assert resumed.first_step == 6
    assert resumed.curve == whole.curve  # weights, optimizer, schedule, noise: all restored
    for a, b in zip(resumed.module.parameters(), whole.module.parameters()):
        assert torch.equal(a, b)


def test_batches_that_run_out_are_an_error_not_a_shorter_fit():
    cfg = LoopConfig(steps=10, batch_size=8, lr=1e-2)
    with pytest.raises(RuntimeError, match="ran out after 4 of 10 steps"):
        train(_Noisy, _batches(4), _loss, cfg)


def test_zero_3_gathers_the_weights_before_saving(tmp_path, ray_local):
    """ZeRO-3 partitions every parameter across workers (one worker here holds a
    0-element placeholder per parameter, and a plain save_pretrained writes those); the
    fit gathers them before saving, so the saved model is the trained one: the same as
    stage 0 trains, evaluated to the same test loss."""
    from safetensors.torch import load_file

    from engine import strategies as S
    from engine.corpus import CorpusStore
    from engine.families import get_family
    from engine.files import Location
    from engine.fit import FitContext

    losses = {}
    for stage in (0, 3):
        family = get_family("lm").from_params({
            "stories": 200, "test_stories": 40, "vocab_size": 300, "model": "tiny",
            "context": 64, "batch_size": 8, "epochs": 1, "trainer": "local",
            "zero_stage": stage})
        family.validate()
        real = family.real_data(0, 1, tmp_path / "real")
        chunk = real.train_chunks[0]  # the whole training split: one chunk
        store = CorpusStore(tmp_path / f"corpus{stage}")
        store.link(S.real(1), chunk)  # as a chain does
        mix = store.stream(S.get("replace").mix(1, chunk.rows), 0)  # as a local fit reads it
        model = family.fit(real, mix, 0,
                           FitContext(Location(str(tmp_path / f"w{stage}"))))
        weights = load_file(f"{model.path}/model.safetensors")
        assert weights and all(t.numel() > 0 for t in weights.values())
        losses[stage] = family.evaluate(real, model)["test_loss"]
    assert losses[3] == pytest.approx(losses[0], rel=1e-4)
    assert losses[0] < np.log(300)  # it learned something


def test_an_lm_fit_on_ray_train_workers_streams_its_mix_and_trains(tmp_path, ray_local):
    """The default trainer: a Ray Train TorchTrainer whose DeepSpeed worker streams its
    shard of the mix (a Ray Dataset of the store's files) and packs it into blocks; the
    step count comes from the manifest, the model comes back through Ray Train's
    checkpoint with the fit's record beside it. The mix is weighted (a workflow's
    `weights`): real stories 1, synthetic 0, the synthetic stories one token repeated,
    which a model that saw their loss learns (with both kinds weighted 1 the repeated
    story's loss came out 0.53, 2026-12-03; here it stays above 1)."""
    import json

    from transformers import AutoModelForCausalLM

    from engine import strategies as S
    from engine.corpus import CorpusStore
    from engine.families import get_family
    from engine.files import Location
    from engine.fit import FitContext

    family = get_family("lm").from_params({
        "stories": 200, "test_stories": 40, "vocab_size": 300, "model": "tiny",
        "context": 64, "batch_size": 8, "epochs": 1, "trainer": "ray",
        "cpus_per_worker": 0.5, "checkpoint_minutes": 0})
    family.validate()
    real = family.real_data(0, 1, tmp_path / "real")
    chunk = real.train_chunks[0]
    store = CorpusStore(tmp_path / "corpus")
    store.link(S.real(1), chunk)
    repeated = [[5] * 40] * 100
    store.write(S.synthetic(1), pa.table({"ids": repeated, "n_tokens": [40] * 100}),
                model="one token repeated")
    mix = S.workflow("w", {"name": "w", "real": {"fraction": 1.0}, "synthetic": {"rows": 100},
                           "weights": {"real": 1, "synthetic": 0}}).mix(2, chunk.rows)
    model = family.fit(real, store.dataset(mix, 0, shuffle_files=True,
                                           weight_unit=family.weight_unit), 0,
                       FitContext(Location(str(tmp_path / "work")), weighted=True,
                                  mix_size=lambda column: store.mix_size(mix, 0, column)))
    record = json.loads((Path(model.path) / "fit.json").read_text())
    tokens, stories = store.mix_size(mix, 0, "n_tokens")
    assert record["world_size"] == 1 and record["resumed_at_step"] is None
    assert record["steps"] == (tokens + stories + 1) // 64 // 8  # one epoch of whole batches
    assert family.evaluate(real, model)["test_loss"] < np.log(300)  # it learned something
    net = AutoModelForCausalLM.from_pretrained(model.path)
    story = torch.tensor([[real.eos] + repeated[0]])
    with torch.no_grad():
        assert net(input_ids=story, labels=story).loss > 1.0  # weight 0: never learned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bench/gpu_check.py "
                    "records the GPU run)")
def test_on_a_gpu_the_loop_trains_there_in_bf16():
    cfg = LoopConfig(steps=4, batch_size=8, lr=1e-2, precision="auto")
    trained = train(_Noisy, _batches(4), _loss, cfg)  # _loss asserts each batch's device
    assert all(p.device.type == "cuda" for p in trained.module.parameters())
    if torch.cuda.is_bf16_supported():
        assert all(p.dtype == torch.bfloat16 for p in trained.module.parameters())
