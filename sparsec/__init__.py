"""sparsec: an ONNX graph-level sparsification compiler."""

__version__ = "0.1.0"
