"""Pretrained checkpoints as a study's `model:` (Shumailov et al., Nature 2024: OPT-125m
fine-tuned generation after generation).

`model:` is a zoo size (engine/families/lm/zoo.py: fresh weights) or a checkpoint that
transformers loads: a Hugging Face id (`facebook/opt-125m`, or `hf://facebook/opt-125m`),
a local directory, or an object-store URI (s3://, gs://: each node reads its own copy).
A pretrained model brings its tokenizer (unless the study names another), and every
generation starts from its weights (`start: scratch`) or from the previous
generation's (`start: warm`).
"""
from __future__ import annotations

import re
from pathlib import Path

from engine.errors import BadInput
from engine.families.lm.zoo import ZOO

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_pretrained(model: str) -> bool:
    return model not in ZOO


def problem(model: str) -> str | None:
    """Why `model` names neither a zoo size nor a loadable checkpoint; None if it does."""
    from engine.files import is_remote, split_uri

    if not is_pretrained(model):
        return None
    scheme, rest = split_uri(model)
    if scheme == "hf" or (not scheme and HUB_ID.match(model) and not Path(model).exists()):
        return None  # a hub id: read when the study runs
    if is_remote(model):
        return None if scheme in ("s3", "gs", "gcs") else \
            f"{model}: unsupported scheme {scheme}:// (s3://, gs://, hf:// or a path)"
    if not (Path(model) / "config.json").exists():
        return (f"{model!r} is neither a zoo size ({', '.join(ZOO)}) nor a checkpoint "
                "directory with a config.json, nor a Hugging Face id such as "
                "facebook/opt-125m")
    return None


def loadable(model: str) -> str:
    """What transformers' from_pretrained takes: a hub id, or a path on this node (an
    object-store checkpoint is copied here first)."""
    from engine.files import local_copy, split_uri

    scheme, rest = split_uri(model)
    if scheme == "hf":
        return rest.lstrip("/")
    # a path or bucket URI; a hub id (no such directory here) passes through unchanged
    return str(local_copy(model))


def tokenizer(model: str):
    """The checkpoint's own tokenizer, with the engine's conventions: its end-of-text
    token separates stories (and starts each sampled one); padding falls back to it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(loadable(model), use_fast=True)
    if tok.eos_token is None:
        raise BadInput(f"family.model: {model}'s tokenizer has no end-of-text token, "
                         "which separates stories")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers a connection at all."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def parameter_count(model: str) -> int:
    """Parameters of the checkpoint's architecture, counted on the meta device (no
    weights read; a hub id's config is fetched)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = loadable(model)
    try:  # a local directory, or a hub id already in this machine's cache
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        if not Path(source).exists() and not hub_reachable():
            # One quick look, not the hub client's minute of retries, each said on stderr
            raise BadInput(f"family.model: {model}: not cached here, and the Hugging Face "
                           "hub cannot be reached from this machine; give the path of a "
                           "local copy (a directory with its config.json)") from None
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as e:  # no such model
            raise BadInput(f"family.model: {model}: its config cannot be read here "
                           f"({str(e).splitlines()[0]}); offline, give the path of a local "
                           "copy") from None
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in built.parameters())


