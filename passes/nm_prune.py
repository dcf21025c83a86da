"""N:M semi-structured pruning of MatMul / Gemm / Conv weights.

Before: ``Y = MatMul(X, W)`` with a dense constant ``W`` of shape (K, N).
After:  the same node; in every group of M consecutive weights along K (the reduction axis:
Gemm's ``transA``/``transB`` and MatMul's operand order honoured; a Conv's input channels at
each kernel position) at most N are non-zero, as sparse tensor cores (2:4) want.

Lossy: the model's outputs change; compile measures the fidelity. Only TensorRT (with
``trt_sparsity_enable``) runs 2:4 weights faster; see ``sparsec targets``. Methods: magnitude,
wanda, sparsegpt (see :mod:`sparsec.passes.prune_methods`).

Quantized weights (DequantizeLinear, MatMulNBits) are pruned after dequantization and
written back with pruned codes equal to their zero point, so they dequantize to exactly 0.

Skipped (see :mod:`sparsec.passes.prune` for the common rules): K not divisible by M
(NOT_DIVISIBLE); weights already N:M (ALREADY_SPARSE: left bit-identical, so a second run
changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsec.errors import OptionError
from sparsec.pipeline import option, register
from sparsec.sparsity import NMLayout
from sparsec.targets import NM_2_4, NM_OTHER

from .prune import PruneOptions, WeightPrunePass


@dataclass(frozen=True)
class NMOptions(PruneOptions):
    n: int = option(2, "non-zeros kept in each group", min=1, max=64, search=(1, 2, 4))
    m: int = option(4, "group size along the reduction axis", min=2, max=128, search=(4, 8))

    def validate(self) -> None:
        super().validate()
        if self.n >= self.m:
            raise OptionError(f"nm: n must be smaller than m (got n={self.n}, m={self.m})")


@register
class NMPrunePass(WeightPrunePass):
    """Keep the N highest-scoring weights in every group of M along the reduction axis."""

    id = "nm"
    summary = "N:M semi-structured pruning (2:4 default) along the reduction axis"
    matches = ("MatMul / Gemm / Conv with a constant float weight (stored as it is, behind DequantizeLinear"
               " or Cast) or a com.microsoft MatMulNBits, whose reduction size divides by M")
    Options = NMOptions

    def layout(self, sparsity: float | None = None) -> NMLayout:
        return NMLayout(self.options.n, self.options.m)

    def sparse_form(self) -> str:
        return NM_2_4 if (self.options.n, self.options.m) == (2, 4) else NM_OTHER
