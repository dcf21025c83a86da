"""Example models (installed as ``sparsec.models``): builders, cached exports, real inputs.

* :mod:`.zoo` -- the registry, the export cache and the torch.onnx dynamo export helper
* :mod:`.bert` -- ``minilm`` (real weights) and ``tiny-bert``
* :mod:`.llama` -- ``tiny-llama``
* :mod:`.cnn` -- ``cnn``
* :mod:`.large` -- ``large-decoder``: 3.4 GB of random weights, built without torch
* :mod:`.text` -- real English text, split into calibration and evaluation halves
"""

from .zoo import build, entries, entry_for, get

__all__ = ["build", "entries", "entry_for", "get"]
