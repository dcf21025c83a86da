"""Example models (installed as ``sparsec.models``): builders, cached exports, real inputs.

* :mod:`.zoo` -- the registry, the export cache and the torch.onnx dynamo export helper
* :mod:`.bert` -- ``minilm`` (real weights) and ``tiny-bert``
* :mod:`.llama` -- ``tiny-llama``, ``smollm2`` (real weights), their KV-cache exports
* :mod:`.moe` -- ``tiny-mixtral``, ``tiny-qwen2-moe``, ``tiny-olmoe``: Mixture-of-Experts exports
* :mod:`.cnn` -- ``cnn``
* :mod:`.large` -- ``large-decoder``: 3.4 GB of random weights, built without torch
* :mod:`.text` -- real English text, split into calibration and evaluation halves
"""

from .zoo import build, entries, entry_for, get

__all__ = ["build", "entries", "entry_for", "get"]
