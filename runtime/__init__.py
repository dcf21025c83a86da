"""Running models with ONNX Runtime: one session factory, benchmarking."""
