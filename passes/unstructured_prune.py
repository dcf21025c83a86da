"""Unstructured pruning: a fraction of each weight's entries set to zero, anywhere.

Before: a dense constant weight of a MatMul / Gemm / Conv. After: the same node, ``sparsity``
of the weight zero. magnitude compares all weights of a layer; wanda compares weights of one
output row (as published); sparsegpt chooses per block of columns and reconstructs the rest.
With ``allocation=owl`` the sparsity differs per layer (outlier-weighted, see
:mod:`sparsec.passes.allocation`); the mean over layers stays ``sparsity``.

Lossy. No ONNX Runtime provider runs unstructured sparsity faster; its gain is a smaller file
with compressed storage (the ``compress`` pass).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsec.pipeline import option, register
from sparsec.sparsity import UnstructuredLayout
from sparsec.targets import UNSTRUCTURED

from .prune import AllocationOptions, WeightPrunePass


@dataclass(frozen=True)
class UnstructuredOptions(AllocationOptions):
    sparsity: float = option(0.5, "fraction of zeros in each pruned weight (the mean over layers"
                             " with allocation=owl)", min=0.01, max=0.99, search=(0.3, 0.5, 0.7))


@register
class UnstructuredPrunePass(WeightPrunePass):
    """Zero the lowest-scoring fraction of each weight."""

    id = "unstructured"
    summary = "unstructured pruning to a given fraction of zeros"
    matches = ("MatMul / Gemm / Conv with a constant float weight (stored as it is, behind DequantizeLinear"
               " or Cast) or a com.microsoft MatMulNBits")
    Options = UnstructuredOptions

    def layout(self, sparsity: float | None = None) -> UnstructuredLayout:
        return UnstructuredLayout(self.options.sparsity if sparsity is None else sparsity)

    def sparse_form(self) -> str:
        return UNSTRUCTURED
