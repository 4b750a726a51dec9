"""Plain autoencoders on images (the survey's Fig. 11): the `vae` family with no KL term;
sampling fits a Gaussian to the training images' latents and decodes draws from it.
Everything but the defaults is engine/families/vae."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.families.vae import (  # noqa: F401 — the family interface, shared with vae
    chain_cpus, chain_gpus, cost, curves, evaluate, fit, load_model, metrics, model_name, preview, real_data,
    placement, sample, sample_stats, save_model, validate)
from engine.families.vae import Params as _VAEParams

name = "ae"


@dataclass(frozen=True)
class Params(_VAEParams):
    kind: Literal["vae", "ae"] = "ae"
