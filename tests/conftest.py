"""Shared fixtures: the --runslow switch and cached example-model exports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
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
