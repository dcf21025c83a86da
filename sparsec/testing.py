"""Equivalence checks for users' CI: ``assert_equivalent`` and a pytest fixture.

    from sparsec.testing import assert_equivalent

    def test_compiled_model_answers_like_the_original():
        assert_equivalent("model.onnx", "model.sparse.onnx", min_cosine=0.99)

With ``atol``/``rtol`` (or neither a budget nor tolerances: per-dtype defaults) every element
must be within tolerance (an element fails only where both are exceeded); with ``min_cosine``
every output's cosine against the reference must reach it, with ``max_rel_err`` every output's
relative L2 error (``||candidate - reference|| / ||reference||``) stay at most it. Tolerances
and a budget can be given together.
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
    max_rel_err: float | None = None,
    seed: int = 0,
    samples: int = 2,
    dims: Mapping[str, int] | None = None,
) -> Verdict:
    """Assert that ``candidate`` answers like ``reference``; return the verdict when it does.

    Raises:
        AssertionError: an output differs beyond tolerance, falls below ``min_cosine`` or moves
            more than ``max_rel_err``.
        sparsec.errors.SparsecError: a model or the inputs cannot be used.
    """
    from sparsec.feeds import make_feeds
    from sparsec.model_io import load_model
    from sparsec.verify import Budget, judge, verify_models

    from sparsec.runtime.session import cpu_runner

    ref = load_model(reference)
    cand = load_model(candidate)
    runner = cpu_runner()
    feeds = make_feeds(ref.model, inputs=inputs, seed=seed, dims=dims, samples=samples,
                       check=runner.checker(ref.runnable))
    budget = Budget(min_cosine=min_cosine, max_rel_err=max_rel_err)
    judge_tolerance = budget.empty or atol is not None or rtol is not None
    verdict = verify_models(ref.runnable, cand.runnable, feeds.sets, atol=atol, rtol=rtol, inputs=feeds.note,
                            exact=judge_tolerance, runner=runner)
    judgement = judge({"given": verdict}, None if budget.empty else budget, exact=judge_tolerance)
    if not judgement.passed:
        bad = [c for c in judgement.checks if not c.ok]
        problems = "; ".join(dict.fromkeys(
            "outputs differ beyond tolerance" if c.kind == "tolerance"
            else f"{c.what}{f' {c.value:.6f}' if c.value is not None else ''} {c.threshold}".strip() for c in bad))
        raise AssertionError(f"{candidate} is not equivalent to {reference}: {judgement.status}: {problems}\n"
                             + "\n".join(verdict.lines()))
    return verdict
