"""Shared fixtures: the --runslow and --integration switches and cached example-model exports.

* ``slow``: real pretrained decoders (SmolLM2) or long runs; ``--runslow``.
* ``integration``: whole-program runs (wheel builds, the README's commands, many subprocess
  compiles); ``--integration``. CI runs them (the README's test command passes the flag); the
  quick local loop ``python -m pytest -q`` leaves them out.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption("--integration", action="store_true", help="also run tests marked integration")


def pytest_collection_modifyitems(config, items):
    for marker, flag in (("slow", "--runslow"), ("integration", "--integration")):
        if config.getoption(flag):
            continue
        skip = pytest.mark.skip(reason=f"{marker}: run with {flag}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def zoo_path():
    """Build (or take from the cache) an example model; returns its path."""
    from sparsec.models import build

    cache = os.environ.get("SPARSEC_CACHE")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, cache_dir=cache)
        return built[name]

    return get
