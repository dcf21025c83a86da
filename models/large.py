"""A random-weight decoder larger than protobuf's 2 GB limit, written without torch.

Shape of a LLaMA MLP stack: token embedding, ``layers`` blocks of LayerNormalization and a
SwiGLU FFN with a residual, a final LayerNormalization and an untied output projection. The
weights are drawn per tensor (seeded) and streamed into the external data file one at a time,
so building it needs memory for one tensor, not for the model. Defaults give about 3.4 GB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .zoo import ZOO_KEY, ZooModel, register


def build_large_decoder(path: Path, *, layers: int = 14, hidden: int = 2048, ffn: int = 8192,
                        vocab: int = 32000, seed: int = 0, name: str = "large-decoder") -> Path:
    """Write ``path / model.onnx`` and its ``model.onnx.data``; return the model path."""
    model_path = Path(path) / "model.onnx"
    data_name = "model.onnx.data"
    initializers: list[TensorProto] = []
    offset = 0
    with open(Path(path) / data_name, "wb") as data:

        def weight(tensor_name: str, shape: tuple[int, ...], scale: float, index: int) -> None:
            nonlocal offset
            rng = np.random.default_rng(seed + index)
            array = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
            data.write(array.tobytes())
            tensor = TensorProto(name=tensor_name, data_type=TensorProto.FLOAT, dims=list(shape))
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(tensor)
            offset += array.nbytes

        nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["x0"], name="embed")]
        weight("embed.weight", (vocab, hidden), 0.02, 0)
        ones = onnx.numpy_helper.from_array(np.ones(hidden, np.float32), "ln.ones")
        zeros = onnx.numpy_helper.from_array(np.zeros(hidden, np.float32), "ln.zeros")
        for i in range(layers):
            p = f"layers.{i}"
            x, h = f"x{i}", f"{p}.h"
            nodes += [
                helper.make_node("LayerNormalization", [x, "ln.ones", "ln.zeros"], [h], name=f"{p}.norm", axis=-1),
                helper.make_node("MatMul", [h, f"{p}.mlp.gate_proj.weight"], [f"{p}.gate"], name=f"{p}.mlp.gate_proj"),
                helper.make_node("MatMul", [h, f"{p}.mlp.up_proj.weight"], [f"{p}.up"], name=f"{p}.mlp.up_proj"),
                helper.make_node("Sigmoid", [f"{p}.gate"], [f"{p}.sig"], name=f"{p}.sigmoid"),
                helper.make_node("Mul", [f"{p}.gate", f"{p}.sig"], [f"{p}.silu"], name=f"{p}.silu"),
                helper.make_node("Mul", [f"{p}.silu", f"{p}.up"], [f"{p}.act"], name=f"{p}.act"),
                helper.make_node("MatMul", [f"{p}.act", f"{p}.mlp.down_proj.weight"], [f"{p}.down"], name=f"{p}.mlp.down_proj"),
                helper.make_node("Add", [x, f"{p}.down"], [f"x{i + 1}"], name=f"{p}.residual"),
            ]
            weight(f"{p}.mlp.gate_proj.weight", (hidden, ffn), hidden ** -0.5, 3 * i + 1)
            weight(f"{p}.mlp.up_proj.weight", (hidden, ffn), hidden ** -0.5, 3 * i + 2)
            weight(f"{p}.mlp.down_proj.weight", (ffn, hidden), ffn ** -0.5, 3 * i + 3)
        nodes += [helper.make_node("LayerNormalization", [f"x{layers}", "ln.ones", "ln.zeros"], ["final"],
                                   name="final_norm", axis=-1),
                  helper.make_node("MatMul", ["final", "lm_head.weight"], ["logits"], name="lm_head")]
        weight("lm_head.weight", (hidden, vocab), hidden ** -0.5, 3 * layers + 1)
    graph = helper.make_graph(
        nodes, "large_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        [*initializers, ones, zeros])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    helper.set_model_props(model, {ZOO_KEY: name})
    onnx.save(model, str(model_path))
    return model_path


LARGE_DECODER = register(ZooModel(
    name="large-decoder",
    description="random-weight decoder-shaped MLP stack of about 3.4 GB (14 SwiGLU blocks, hidden 2048,"
    " FFN 8192), beyond protobuf's 2 GB limit; built without torch",
    kind="decoder", real_weights=False, version=1, builder=lambda path: build_large_decoder(path),
    slow=True, needs_torch=False, size="3.4 GB",
))
