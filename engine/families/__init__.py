"""Model families, looked up by the name a study file gives.

Modules are imported only when a study names them, so reading a study file never
imports torch (the language-model family) unless that study needs it.
"""
from __future__ import annotations

import importlib

from engine.families.base import Family, ModuleFamily, ParamError

FAMILY_MODULES = {
    "linear": "engine.families.linear",
    "gaussian": "engine.families.gaussian",
    "lm": "engine.families.lm",
    "logistic": "engine.families.logistic",
    "vae": "engine.families.vae",
    "ae": "engine.families.ae",
    "diffusion": "engine.families.diffusion",
}


def get_family(name: str) -> Family:
    try:
        module = FAMILY_MODULES[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r} (known: {', '.join(FAMILY_MODULES)})") from None
    return ModuleFamily(importlib.import_module(module))


__all__ = ["Family", "ParamError", "FAMILY_MODULES", "get_family"]
