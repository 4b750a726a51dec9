"""A pretrained checkpoint as `model:` (issue 14.2): a tiny OPT saved here stands in for
facebook/opt-125m (nothing is downloaded); every generation is fine-tuned from its
weights, with its own tokenizer, through the chain the studies run."""
import json

import numpy as np
import pytest

from conftest import write_study
from engine.chain import run_chain
from engine.spec import load_study


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    """An OPT checkpoint directory with its tokenizer (a BPE trained on grammar stories:
    the hub's OPT tokenizer cannot be downloaded here)."""
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    from engine.families.lm import grammar
    from engine.families.lm.tokenizer import train_tokenizer

    where = tmp_path_factory.mktemp("pretrained") / "tiny-opt"
    tokenizer = train_tokenizer([s.text for s in grammar.sample_stories(400, 1)], 320)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                       ffn_dim=64, num_attention_heads=2, max_position_embeddings=128,
                       word_embed_proj_dim=32, bos_token_id=tokenizer.eos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def weights(directory):
    from safetensors.numpy import load_file

    return load_file(f"{directory}/model.safetensors")


STUDY = """\
name: pretrained
family:
  name: lm
  model: {model}
  stories: 300
  test_stories: 50
  context: 64
  max_new_tokens: 30
  batch_size: 8
  epochs: 1
  lr: {lr}
  trainer: local
  sampler: hf
  sample_batch_size: 100
strategies: [replace]
generations: 2
seeds: [0]
out: {out}
"""


def test_every_generation_is_fine_tuned_from_the_checkpoint_with_its_tokenizer(tmp_path, tiny_opt):
    study = load_study(write_study(tmp_path / "s.yaml", STUDY.format(
        model=tiny_opt, lr="0.000001", out=tmp_path / "out")))
    trial = study.trials()[0]
    run_chain(trial, 2, study.out)
    chain = tmp_path / "out" / "trials" / trial.trial_id
    start = weights(tiny_opt)
    # generation 1's model (fit once for the study, kept in shared/models)
    [model] = (tmp_path / "out" / "shared" / "models").iterdir()
    assert json.loads((model / "config.json").read_text())["model_type"] == "opt"
    fitted = weights(model)
    # a learning rate of 1e-6 leaves the checkpoint's weights almost as they were: the
    # fit began from them (a fresh OPT would differ by ~0.02 everywhere)
    shared = [k for k in start if k in fitted]
    assert len(shared) >= len(start) - 1
    assert max(np.abs(fitted[k] - start[k]).max() for k in shared) < 1e-3
    assert max(np.abs(fitted[k] - start[k]).max() for k in shared) > 0  # it trained
    # the checkpoint's tokenizer, not a BPE trained for the study
    saved = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    assert saved == json.loads((tiny_opt / "tokenizer.json").read_text())["model"]["vocab"]
    # both generations fine-tuned the pretrained weights (start: scratch), not the last
    log = (chain / "chain.log").read_text()
    assert log.count(f"fit: fine-tuning the pretrained {tiny_opt}") == 2, log
    from engine import results

    table = results.collect(study)
    loss = table[(table.metric == "test_loss") & table.step.isna()].set_index("generation").value
    assert set(loss.index) == {1, 2} and np.isfinite(loss).all()


def test_a_model_that_is_neither_a_size_nor_a_checkpoint_is_refused(tmp_path):
    from engine.spec import SpecError

    f = write_study(tmp_path / "s.yaml", STUDY.format(model=tmp_path / "nothing", lr=1e-3,
                                                      out=tmp_path / "out"))
    with pytest.raises(SpecError, match="family.model: .*nothing' is neither a zoo size"):
        load_study(f)
    # a hub id is accepted as written (read when the study runs)
    assert load_study(f, ["family.model=facebook/opt-125m"]).family_params["model"] == \
        "facebook/opt-125m"


def test_the_plan_counts_the_checkpoints_parameters(tiny_opt):
    from safetensors.numpy import load_file

    from engine.families import get_family

    family = get_family("lm").from_params({"model": str(tiny_opt)})
    family.validate()
    cost = family.cost()
    stored = load_file(f"{tiny_opt}/model.safetensors")
    # the checkpoint stores each tensor once (OPT ties its output layer to the input
    # embeddings, which the count includes once too)
    assert cost.parameters == sum(v.size for v in stored.values())
    assert "(pretrained, with its own tokenizer)" in cost.note
