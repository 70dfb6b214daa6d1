"""Distillation methods, one module each (``base.py`` says what a method is). Importing the
package imports every module in it, so a new method is one new file: its class, decorated
with ``@register``, is in ``--method`` from then on.

``--method`` names the terms beside the hard-label cross-entropy: at most one logit method
and any feature methods, joined by ``+`` (``kd+at``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from typing import Mapping

from ..cli import ToolError
from .base import METHODS, FeatureMethod, Flag, LogitMethod, Method, register

__all__ = ["METHODS", "DEFAULT_METHOD", "FeatureMethod", "Flag", "LogitMethod", "Method",
           "register", "parse_method", "build_methods", "hard_label_weight", "method_flags",
           "add_method_arguments", "method_flag_bounds", "preset_for_method",
           "method_settings"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# The public reference's method, and the mission's.
DEFAULT_METHOD = "kd"


def _ordered() -> list[type[Method]]:
    """Logit methods first (the default first of all), then feature methods, each by name."""
    return sorted(METHODS.values(), key=lambda method: (
        method.reads != "logits", method.name != DEFAULT_METHOD, method.name))


def parse_method(method: str) -> list[str]:
    """``--method``'s parts, checked: known, each once, at most one logit method."""
    parts = [part.strip() for part in method.lower().split("+") if part.strip()]
    unknown = [part for part in parts if part not in METHODS]
    names = [known.name for known in _ordered()]
    if not parts or unknown:
        raise ToolError(f"--method {method!r}: unknown part(s) {', '.join(unknown) or '(empty)'};"
                        f" use {', '.join(names)} joined by +")
    logit_parts = [part for part in parts if METHODS[part].reads == "logits"]
    if len(set(parts)) != len(parts) or len(logit_parts) > 1:
        logits = ", ".join(known.name for known in _ordered() if known.reads == "logits")
        raise ToolError(f"--method {method!r}: each part once, and at most one of {logits}")
    return parts


def build_methods(method: str, settings: Mapping) -> list[Method]:
    """The parts of ``method``, each built with its flags' values from ``settings``."""
    return [METHODS[part](settings) for part in parse_method(method)]


def hard_label_weight(method: str) -> float:
    """``--alpha``'s default: the smallest any part asks for (its paper's)."""
    return min(METHODS[part].hard_label_weight for part in parse_method(method))


def method_flags() -> list[Flag]:
    """Every method's flags, each once (a flag several methods share comes once)."""
    flags = {}
    for method in _ordered():
        for flag in method.flags:
            flags.setdefault(flag.name, flag)
    return list(flags.values())


def method_flag_bounds() -> dict[str, tuple]:
    return {flag.name: flag.bounds for flag in method_flags()}


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """``--method``, ``--alpha`` and every method's flags, in an argument group of their own."""
    group = parser.add_argument_group(
        "distillation methods", "Loss = alpha*CE + the terms --method names. Logit methods: "
        + "; ".join(f"{method.name} ({method.summary})" for method in _ordered()
                    if method.reads == "logits")
        + ". Feature methods, on the maps --feature-layers names (teacher maps pooled to the "
          "student's size; a learned 1x1 projection where a method compares channels): "
        + "; ".join(f"{method.name} ({method.summary})" for method in _ordered()
                    if method.reads == "features")
        + ". Defaults are the papers'.")
    names = [method.name for method in _ordered()]
    logit_names = [method.name for method in _ordered() if method.reads == "logits"]
    group.add_argument("--method", default=DEFAULT_METHOD,
                       help=f"{', '.join(names)}, or one logit method "
                            f"({', '.join(logit_names)}) and feature methods joined by + "
                            f"(kd+at)")
    lighter = {method.name: method.hard_label_weight for method in _ordered()
               if method.hard_label_weight != 1.0}
    group.add_argument("--alpha", type=float, default=None,
                       help="weight of the hard-label cross-entropy (default: "
                            + ", ".join(f"{weight:g} with {name}"
                                        for name, weight in lighter.items())
                            + ", 1.0 otherwise, as in each method's paper; a preset's alpha "
                              "and method settings apply only with the method they are for)")
    for flag in method_flags():
        users = [method.name for method in _ordered() if flag in method.flags]
        group.add_argument(flag.option, type=flag.type, default=flag.default,
                           help=f"{', '.join(users)}: {flag.help}")


def preset_for_method(preset: Mapping, method: str) -> dict:
    """A ``--recipe`` preset's settings that apply with ``method``: a setting of a method
    not in it is left out, and with it the preset's ``alpha``, which balanced that term
    against the cross-entropy (alpha then keeps the method's own default instead of
    cutting the cross-entropy with nothing to take the rest)."""
    parts = parse_method(method)
    unused = {flag.name for name, known in METHODS.items() if name not in parts
              for flag in known.flags} - {flag.name for part in parts
                                          for flag in METHODS[part].flags}
    if not unused & set(preset):
        return dict(preset)
    return {key: value for key, value in preset.items() if key not in unused | {"alpha"}}


def method_settings(method: str, settings: Mapping) -> dict[str, dict]:
    """What config.json records of the distillation: each part's flags as in force."""
    return {part.name: dict(part.settings) for part in build_methods(method, settings)}
