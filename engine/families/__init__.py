"""Model families, looked up by the name a study file gives.

A family's module is imported only when a study names it, so reading a study file never
imports torch (the neural families) unless that study needs it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from engine.errors import UnknownName
from engine.families.base import Bundle, Family, ParamError

if TYPE_CHECKING:
    from engine.spec import Trial

# name -> "module:Class"
FAMILIES = {
    "linear": "engine.families.linear:Linear",
    "gaussian": "engine.families.gaussian:Gaussian",
    "logistic": "engine.families.logistic:Logistic",
    "kde": "engine.families.kde:KDE",
    "lm": "engine.families.lm:LanguageModel",
    "vae": "engine.families.vae:VAE",
    "ae": "engine.families.vae:Autoencoder",
    "diffusion": "engine.families.diffusion:Diffusion",
}


def get_family(name: str) -> type[Family]:
    """The family class a study's `family.name` names."""
    try:
        module, cls = FAMILIES[name].split(":")
    except KeyError:
        raise UnknownName(f"unknown family {name!r} (known: {', '.join(FAMILIES)})") from None
    return getattr(importlib.import_module(module), cls)


def family_for(trial: "Trial") -> Family:
    """The family object of one chain, its config built from the trial's parameters."""
    return get_family(trial.family).from_params(trial.params)


__all__ = ["Bundle", "Family", "ParamError", "FAMILIES", "get_family", "family_for"]
