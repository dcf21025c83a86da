"""Block pruning: whole (rows x cols) tiles of each weight set to zero.

Before: a dense constant weight of a MatMul / Gemm / Conv. After: the same node; in canonical
(output, reduction) form the weight is a grid of ``block`` tiles of which a ``sparsity`` fraction
is entirely zero. Tiles from 4x4 to 32x32. Scores are summed per tile (magnitude, wanda) or
chosen per tile column inside the SparseGPT sweep.

Lossy. No ONNX Runtime provider runs block-sparse weights faster today; the layout suits
block-sparse kernels and compresses well (the ``compress`` pass).

Skipped: weights whose output or reduction size does not divide by the block (NOT_DIVISIBLE).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsec.errors import OptionError
from sparsec.pipeline import option, register
from sparsec.sparsity import BlockLayout
from sparsec.targets import BLOCK

from .prune import AllocationOptions, WeightPrunePass

BLOCK_SIZES = (4, 8, 16, 32)


@dataclass(frozen=True)
class BlockOptions(AllocationOptions):
    rows: int = option(4, "block height (output features)", choices=BLOCK_SIZES, search=BLOCK_SIZES)
    cols: int = option(4, "block width (along the reduction axis)", choices=BLOCK_SIZES, search=BLOCK_SIZES)
    sparsity: float = option(0.5, "fraction of blocks that are zero", min=0.01, max=0.99, search=(0.3, 0.5, 0.7))

    def validate(self) -> None:
        super().validate()
        if self.refine != "none":
            raise OptionError(f"block: refine={self.refine} swaps single weights, not tiles")
        if self.method == "sparsegpt" and self.blocksize % self.cols:
            raise OptionError(f"block: blocksize ({self.blocksize}) must be a multiple of cols ({self.cols})")


@register
class BlockPrunePass(WeightPrunePass):
    """Zero the lowest-scoring tiles of each weight."""

    id = "block"
    summary = "block pruning: whole tiles (4x4 to 32x32) of a weight set to zero"
    matches = ("MatMul / Gemm / Conv with a constant float weight (stored as it is, behind DequantizeLinear"
               " or Cast) or a com.microsoft MatMulNBits, whose canonical shape divides by the block")
    Options = BlockOptions

    def layout(self, sparsity: float | None = None) -> BlockLayout:
        return BlockLayout(self.options.rows, self.options.cols,
                           self.options.sparsity if sparsity is None else sparsity)

    def sparse_form(self) -> str:
        return BLOCK
