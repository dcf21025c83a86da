"""The transformations sparsec applies, one module per family.

Importing this package registers every built-in pass; ``sparsec passes`` lists them.

* :mod:`.patterns` -- the shared subgraph matchers and skip codes
* :mod:`.quantized` -- weights read through DequantizeLinear, MatMulNBits or Cast: decode, re-encode
* :mod:`.prune` -- the weight-pruning site loop shared by the pruning passes
* :mod:`.prune_methods` -- magnitude, Wanda and SparseGPT on one weight
* :mod:`.nm_prune` -- ``nm``: N:M semi-structured pruning
* :mod:`.unstructured_prune` -- ``unstructured``: a fraction of zeros anywhere
* :mod:`.block_prune` -- ``block``: whole tiles zero
* :mod:`.compress` -- ``compress``: sparse weights stored as values + bit mask
* :mod:`.quantize` -- ``quantize``: ONNX Runtime's int8 / int4 quantizers, run last, zeros kept exact
* :mod:`.structured_patterns` -- FFN, attention and conv-chain region matchers
* :mod:`.structured_prune` -- ``ffn-neurons``, ``attention-heads``, ``conv-channels``
* :mod:`.blocks` -- typed FFN and attention blocks
* :mod:`.moe` -- ``moe``: FFN -> Mixture-of-Experts (:mod:`.moe_experts`: the numbers behind it,
  :mod:`.moe_lowering`: its three lowerings)
* :mod:`.moe_fuse` -- ``moe-fuse``: a model's own MoE blocks -> com.microsoft.MoE
* :mod:`.attention` -- ``attention``: sparse attention patterns (:mod:`.attention_patterns`) and
  fusion into GroupQueryAttention
* :mod:`.rewrite` -- building rewrites: named, tagged nodes; rewiring
"""

from . import (  # noqa: F401
    attention, block_prune, compress, moe, moe_fuse, nm_prune, quantize, structured_prune, unstructured_prune,
)
