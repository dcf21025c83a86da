"""Equivalence checks for users' CI: ``assert_equivalent`` and a pytest fixture.

    from sparsec.testing import assert_equivalent

    def test_compiled_model_answers_like_the_original():
        assert_equivalent("model.onnx", "model.sparse.onnx", min_cosine=0.99)

With ``atol``/``rtol`` (or neither ``min_cosine`` nor tolerances: per-dtype defaults) every
element must be within tolerance (an element fails only where both are exceeded); with
``min_cosine`` every output's cosine against the reference must reach it. Both can be given.
Inputs are a .npz (or a list of input dicts); by default seeded random inputs built from the
model's input specs. A failure raises ``AssertionError`` whose message holds the verdict lines.

The pytest plugin (installed with sparsec) provides the ``onnx_equivalence`` fixture, the same
function, for tests that prefer fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from sparsec.verify import Verdict


def assert_equivalent(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    min_cosine: float | None = None,
    seed: int = 0,
    samples: int = 2,
    dims: Mapping[str, int] | None = None,
) -> Verdict:
    """Assert that ``candidate`` answers like ``reference``; return the verdict when it does.

    Raises:
        AssertionError: an output differs beyond tolerance or falls below ``min_cosine``.
        sparsec.errors.SparsecError: a model or the inputs cannot be used.
    """
    from sparsec.model_io import load_model
    from sparsec.verify import input_specs, load_feeds, random_feeds, verify_models

    ref = load_model(reference)
    load_model(candidate)
    specs = input_specs(ref.model)
    if inputs is None:
        feeds, note = random_feeds(specs, seed=seed, dims=dims, samples=samples), f"random inputs (seed {seed})"
    elif isinstance(inputs, (str, os.PathLike)):
        feeds, note = load_feeds(inputs, specs), f"inputs from {inputs}"
    else:
        feeds, note = [dict(f) for f in inputs], "given inputs"
    judge_tolerance = min_cosine is None or atol is not None or rtol is not None
    verdict = verify_models(ref.path, candidate, feeds, atol=atol, rtol=rtol, inputs=note,
                            exact=judge_tolerance)
    problems = []
    if not verdict.outputs:
        problems.append("no outputs were compared")
    if judge_tolerance and not verdict.passed:
        problems.append("outputs differ beyond tolerance")
    if min_cosine is not None:
        low = [o for o in verdict.outputs if o.error or o.cosine < min_cosine]
        problems.extend(f"output '{o.name}' cosine {o.cosine:.6f} < min_cosine {min_cosine}"
                        if not o.error else f"output '{o.name}': {o.error}" for o in low)
    if problems:
        raise AssertionError(f"{candidate} is not equivalent to {reference}: {'; '.join(problems)}\n"
                             + "\n".join(verdict.lines()))
    return verdict
