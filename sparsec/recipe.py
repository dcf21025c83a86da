"""Recipes: a compile written down (target, passes with every option, budget, calibration,
verification inputs) as YAML or JSON, so a plan can be reviewed and replayed exactly.

``sparsec compile MODEL --save-recipe r.yaml`` writes one; ``sparsec compile MODEL --recipe
r.yaml`` replays it. Passes are stored with all their options, not only those that differ from
today's defaults, so a later sparsec with other defaults replays the same compile.

    version: 1
    target: ampere
    passes:
      - id: nm
        options: {n: 2, m: 4, method: sparsegpt, ...}
    budget: {min_cosine: 0.95}
    calibration: {source: builtin, samples: 32, seqlen: 512, tokenizer: null}
    verification: {seed: 0, samples: 2, dims: {sequence: 128}}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsec.errors import InputError, OptionError

VERSION = 1
_SECTIONS = {"version", "target", "passes", "budget", "calibration", "verification"}


@dataclass
class Recipe:
    target: str = "cpu"
    passes: list[dict[str, Any]] = field(default_factory=list)  # [{"id": ..., "options": {...}}]
    budget: dict[str, Any] = field(default_factory=dict)  # {"min_cosine": float | None}
    calibration: dict[str, Any] = field(default_factory=dict)  # source, samples, seqlen, tokenizer
    verification: dict[str, Any] = field(default_factory=dict)  # seed, samples, dims
    version: int = VERSION

    def pass_objects(self):
        """The configured passes (options validated as on the command line)."""
        from sparsec.pipeline import get_pass

        return [get_pass(p["id"])(**p.get("options", {})) for p in self.passes]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(data: Any, source: str) -> Recipe:
    if not isinstance(data, dict):
        raise OptionError(f"{source}: a recipe is a mapping with keys {', '.join(sorted(_SECTIONS))}")
    unknown = sorted(set(data) - _SECTIONS)
    if unknown:
        raise OptionError(f"{source}: unknown recipe key '{unknown[0]}' (valid: {', '.join(sorted(_SECTIONS))})")
    if data.get("version", VERSION) != VERSION:
        raise OptionError(f"{source}: recipe version {data.get('version')} is not supported (this sparsec reads {VERSION})")
    passes = data.get("passes", [])
    if not isinstance(passes, list) or not all(isinstance(p, dict) and "id" in p for p in passes):
        raise OptionError(f"{source}: 'passes' must be a list of {{id, options}} mappings")
    for p in passes:
        if not isinstance(p.get("options", {}), dict):
            raise OptionError(f"{source}: options of pass '{p['id']}' must be a mapping")
        extra = sorted(set(p) - {"id", "options"})
        if extra:
            raise OptionError(f"{source}: pass '{p['id']}' has unknown key '{extra[0]}' (valid: id, options)")
    sections = {}
    for name, keys in (("budget", {"min_cosine"}), ("calibration", {"source", "samples", "seqlen", "tokenizer"}),
                       ("verification", {"seed", "samples", "dims"})):
        value = data.get(name) or {}
        if not isinstance(value, dict) or set(value) - keys:
            bad = sorted(set(value) - keys)[0] if isinstance(value, dict) else name
            raise OptionError(f"{source}: '{name}' has unknown key '{bad}' (valid: {', '.join(sorted(keys))})")
        sections[name] = value
    recipe = Recipe(target=str(data.get("target", "cpu")), passes=passes, **sections)
    from sparsec.targets import get_target

    get_target(recipe.target)
    recipe.pass_objects()  # validates every pass and option now, before any work
    mc = recipe.budget.get("min_cosine")
    if mc is not None and not (isinstance(mc, (int, float)) and -1 <= mc <= 1):
        raise OptionError(f"{source}: budget.min_cosine must be a number in [-1, 1], got {mc!r}")
    return recipe


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
    return _check(data, str(path))


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    path = Path(path)
    data = recipe.to_dict()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    path.write_text(text, encoding="utf-8")


def recipe_from(target: str, passes, *, min_cosine=None, calib=None, calib_samples=None, calib_seqlen=None,
                tokenizer=None, seed=0, samples=2, dims=None) -> Recipe:
    """The recipe of a compile with these arguments (passes as configured pass objects)."""
    from sparsec.pipeline import options_dict

    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    return Recipe(
        target=target,
        passes=[{"id": p.id, "options": {k: plain(v) for k, v in options_dict(p.options).items()}} for p in passes],
        budget={"min_cosine": min_cosine},
        calibration={"source": calib, "samples": calib_samples, "seqlen": calib_seqlen, "tokenizer": tokenizer},
        verification={"seed": seed, "samples": samples, "dims": dict(dims or {})},
    )
