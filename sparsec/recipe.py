"""Recipes: what to compile, written down -- the one input of the CLI and the Python API.

A :class:`Recipe` holds the target, the passes with every option (or none: the target's plan),
the fidelity budget, the calibration data and the verification inputs. ``sparsec compile``
builds one from its flags or reads one (``--recipe r.yaml``); :func:`sparsec.compile` takes one
(``recipe=``) or builds one from keyword arguments. ``--save-recipe`` writes the recipe of a
compile with the passes as the plan configured them, all options spelled out, so a later
sparsec with other defaults replays the same compile.

    version: 1
    target: ampere
    passes:
      - id: nm
        options: {n: 2, m: 4, method: sparsegpt, ...}
    budget: {min_cosine: 0.95}
    calibration: {source: builtin, samples: 32, seqlen: 512, tokenizer: null, unit: windows}
    verification: {seed: 0, samples: 2, dims: {sequence: 128}, inputs: null}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsec.errors import InputError, OptionError

VERSION = 1
_SECTIONS = {"version", "target", "passes", "budget", "calibration", "verification", "constant_initializers",
             "objective"}
_KEYS = {
    "budget": {"min_cosine", "min_embedding_cosine", "max_ppl_ratio", "max_rel_err"},
    "calibration": {"source", "samples", "seqlen", "tokenizer", "unit"},
    "verification": {"seed", "samples", "dims", "inputs"},
}
# Keyword arguments of the Python API that fill a recipe, and where each goes.
OPTION_FIELDS = {
    "target": ("target", None), "passes": ("passes", None),
    "min_cosine": ("budget", "min_cosine"), "min_embedding_cosine": ("budget", "min_embedding_cosine"),
    "max_ppl_ratio": ("budget", "max_ppl_ratio"), "max_rel_err": ("budget", "max_rel_err"),
    "calib": ("calibration", "source"), "calib_samples": ("calibration", "samples"),
    "calib_seqlen": ("calibration", "seqlen"), "tokenizer": ("calibration", "tokenizer"),
    "calib_unit": ("calibration", "unit"),
    "seed": ("verification", "seed"), "samples": ("verification", "samples"),
    "dims": ("verification", "dims"), "inputs": ("verification", "inputs"),
    "constant_initializers": ("constant_initializers", None), "objective": ("objective", None),
}


@dataclass
class Recipe:
    target: str = "cpu"
    passes: list[dict[str, Any]] | str | None = None  # [{"id", "options"}], a pass spec, or None: the plan's
    budget: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # source, samples, seqlen, tokenizer, unit
    verification: dict[str, Any] = field(default_factory=dict)  # seed, samples, dims, inputs
    constant_initializers: bool = False  # initializers listed as graph inputs are constants
    objective: str = "latency"  # what the planner minimises: latency, size or memory
    version: int = VERSION

    @classmethod
    def from_options(cls, **options: Any) -> Recipe:
        """A recipe from the keyword arguments of :func:`sparsec.compile` (see OPTION_FIELDS)."""
        unknown = sorted(set(options) - set(OPTION_FIELDS))
        if unknown:
            raise OptionError(f"unknown compile option '{unknown[0]}' (valid: {', '.join(OPTION_FIELDS)})")
        recipe = cls()
        for name, value in options.items():
            section, key = OPTION_FIELDS[name]
            if value is None:
                continue
            if key is None:
                setattr(recipe, section, value)
            else:
                getattr(recipe, section)[key] = value
        return recipe

    def pass_objects(self):
        """The configured passes (options validated as on the command line), or None."""
        from sparsec.pipeline import Pass, get_pass, parse_pass_specs

        if self.passes is None:
            return None
        if isinstance(self.passes, str):
            return parse_pass_specs(self.passes)
        return [p if isinstance(p, Pass) else get_pass(p["id"])(**p.get("options", {})) for p in self.passes]

    def fidelity_budget(self):
        from sparsec.verify import Budget

        return Budget(**{k: v for k, v in self.budget.items() if v is not None}, origin="user")

    @property
    def seed(self) -> int:
        return int(self.verification.get("seed") or 0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["budget"] = {k: v for k, v in self.budget.items() if v is not None}
        return data


def check_recipe(data: Any, source: str) -> Recipe:
    """Validate a recipe read from ``source``: sections, keys, target, passes and options."""
    if not isinstance(data, dict):
        raise OptionError(f"{source}: a recipe is a mapping with keys {', '.join(sorted(_SECTIONS))}")
    unknown = sorted(set(data) - _SECTIONS)
    if unknown:
        raise OptionError(f"{source}: unknown recipe key '{unknown[0]}' (valid: {', '.join(sorted(_SECTIONS))})")
    if data.get("version", VERSION) != VERSION:
        raise OptionError(f"{source}: recipe version {data.get('version')} is not supported (this sparsec reads {VERSION})")
    passes = data.get("passes")
    if passes is not None and (not isinstance(passes, list)
                               or not all(isinstance(p, dict) and "id" in p for p in passes)):
        raise OptionError(f"{source}: 'passes' must be a list of {{id, options}} mappings")
    for p in passes or []:
        if not isinstance(p.get("options", {}), dict):
            raise OptionError(f"{source}: options of pass '{p['id']}' must be a mapping")
        extra = sorted(set(p) - {"id", "options"})
        if extra:
            raise OptionError(f"{source}: pass '{p['id']}' has unknown key '{extra[0]}' (valid: id, options)")
    sections = {}
    for name, keys in _KEYS.items():
        value = data.get(name) or {}
        if not isinstance(value, dict) or set(value) - keys:
            bad = sorted(set(value) - keys)[0] if isinstance(value, dict) else name
            raise OptionError(f"{source}: '{name}' has unknown key '{bad}' (valid: {', '.join(sorted(keys))})")
        sections[name] = dict(value)
    constant = data.get("constant_initializers", False)
    if not isinstance(constant, bool):
        raise OptionError(f"{source}: constant_initializers must be true or false, got {constant!r}")
    recipe = Recipe(target=str(data.get("target", "cpu")), passes=passes, constant_initializers=constant,
                    objective=str(data.get("objective", "latency")), **sections)
    validate(recipe, source)
    return recipe


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Check the target, every pass and option, and the budget, before any work."""
    from sparsec.targets import get_target

    from sparsec.cost import OBJECTIVES

    get_target(recipe.target)
    if recipe.objective not in OBJECTIVES:
        raise OptionError(f"{source}: objective must be one of {', '.join(OBJECTIVES)}, got {recipe.objective!r}")
    recipe.pass_objects()
    from sparsec.data import UNITS

    unit = recipe.calibration.get("unit")
    if unit is not None and unit not in UNITS:
        raise OptionError(f"{source}: calibration.unit must be one of {', '.join(UNITS)}, got {unit!r}")
    for key, low, high in (("min_cosine", -1, 1), ("min_embedding_cosine", -1, 1), ("max_ppl_ratio", 1, None),
                           ("max_rel_err", 0, None)):
        value = recipe.budget.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or value < low or (high is not None and value > high):
            where = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise OptionError(f"{source}: budget.{key} must be a number {where}, got {value!r}")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe (.yaml, .yml or .json)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise several types
        raise InputError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}"
                         f" ({' '.join(str(exc).split())[:200]})") from None
    return check_recipe(data, str(path))


def recipe_text(recipe: Recipe, path: str | os.PathLike) -> str:
    """The recipe as YAML or JSON text, by ``path``'s extension."""
    data = recipe.to_dict()
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2) + "\n"


def with_calibration(recipe: Recipe, **options: Any) -> Recipe:
    """``recipe`` with the calibration options given (calib, calib_samples, calib_seqlen,
    calib_unit, tokenizer; None keeps the recipe's): a recipe replayed on the user's own text."""
    import dataclasses

    calibration = dict(recipe.calibration)
    for name, value in options.items():
        section, key = OPTION_FIELDS[name]
        if section != "calibration":
            raise OptionError(f"'{name}' is not a calibration option")
        if value is not None:
            calibration[key] = value
    changed = dataclasses.replace(recipe, calibration=calibration)
    validate(changed, "calibration options")
    return changed


def replayable(recipe: Recipe, passes) -> Recipe:
    """``recipe`` with the passes the plan configured, every option spelled out."""
    from sparsec.pipeline import options_dict

    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    calibration = dict(recipe.calibration)
    if calibration.get("source") is not None and not isinstance(calibration["source"], (str, os.PathLike)):
        calibration["source"] = None  # a callable or source object cannot be written down
    return Recipe(
        target=recipe.target,
        passes=[{"id": p.id, "options": {k: plain(v) for k, v in options_dict(p.options).items()}} for p in passes],
        budget=dict(recipe.budget), calibration={k: calibration.get(k) for k in sorted(_KEYS["calibration"])},
        verification={"seed": recipe.seed, "samples": recipe.verification.get("samples", 2),
                      "dims": dict(recipe.verification.get("dims") or {}),
                      "inputs": recipe.verification.get("inputs")},
        constant_initializers=recipe.constant_initializers, objective=recipe.objective,
    )
