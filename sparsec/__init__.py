"""sparsec: an ONNX graph-level sparsification compiler.

The Python API mirrors the command line::

    import sparsec

    result = sparsec.compile("model.onnx", target="ampere", output="model.sparse.onnx")
    result.records          # what each pass did
    result.verdicts         # fidelity / equivalence against the original
    result.report()         # the JSON report as a dict

    sparsec.testing.assert_equivalent("model.onnx", "model.sparse.onnx", min_cosine=0.99)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sparsec.compiler import CompileResult


def compile(model: Any, **options: Any) -> CompileResult:  # noqa: A001 (mirrors `sparsec compile`)
    """Compile ``model`` (a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``).

    Takes the keyword arguments of :func:`sparsec.compiler.compile` (target, passes, output,
    report, calib, min_cosine, ...) and returns its :class:`~sparsec.compiler.CompileResult`.
    An in-memory model is written to a temporary file first (verification runs ONNX Runtime
    on files); give ``output`` to keep the result.
    """
    from sparsec.compiler import compile_any

    return compile_any(model, **options)


def __getattr__(name: str) -> Any:
    if name == "testing":
        import sparsec.testing as testing

        return testing
    raise AttributeError(name)
