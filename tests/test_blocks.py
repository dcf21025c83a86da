"""Typed blocks on real exports and on every way an exporter writes an FFN activation.

Each hand-built FFN is also run in ONNX Runtime and compared with a numpy implementation of the
activation the matcher reports, so a wrong classification fails numerically, not only by name.
"""

import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from sparsec.model_io import load_model
from sparsec.passes.blocks import match_attention_block, match_ffn_block
from sparsec.passes.patterns import Code
from tests.helpers import FLOAT, make_model, run_ort, save, weights

H, I = 8, 16

ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
}


def _scalar(name, value):
    return {name: np.array(value, np.float32)}


def activation_nodes(kind, x, out):
    """(nodes, constants) computing ``out = act(x)`` the way some exporter writes it."""
    if kind == "relu":
        return [helper.make_node("Relu", [x], [out])], {}
    if kind == "gelu-op":
        return [helper.make_node("Gelu", [x], [out])], {}
    if kind == "gelu-op-tanh":
        return [helper.make_node("Gelu", [x], [out], approximate="tanh")], {}
    if kind == "gelu-erf":
        return [helper.make_node("Div", [x, "sqrt2"], ["e0"]), helper.make_node("Erf", ["e0"], ["e1"]),
                helper.make_node("Add", ["e1", "one"], ["e2"]), helper.make_node("Mul", [x, "e2"], ["e3"]),
                helper.make_node("Mul", ["e3", "half"], [out])], {**_scalar("sqrt2", math.sqrt(2)),
                                                                  **_scalar("one", 1.0), **_scalar("half", 0.5)}
    if kind == "gelu-tanh":
        return [helper.make_node("Pow", [x, "three"], ["t0"]), helper.make_node("Mul", ["t0", "c"], ["t1"]),
                helper.make_node("Add", [x, "t1"], ["t2"]), helper.make_node("Mul", ["t2", "k"], ["t3"]),
                helper.make_node("Tanh", ["t3"], ["t4"]), helper.make_node("Add", ["t4", "one"], ["t5"]),
                helper.make_node("Mul", [x, "t5"], ["t6"]), helper.make_node("Mul", ["t6", "half"], [out])], {
            **_scalar("three", 3.0), **_scalar("c", 0.044715), **_scalar("k", math.sqrt(2 / math.pi)),
            **_scalar("one", 1.0), **_scalar("half", 0.5)}
    if kind == "silu":
        return [helper.make_node("Sigmoid", [x], ["s0"]), helper.make_node("Mul", [x, "s0"], [out])], {}
    if kind == "quick_gelu":
        return [helper.make_node("Mul", [x, "alpha"], ["q0"]), helper.make_node("Sigmoid", ["q0"], ["q1"]),
                helper.make_node("Mul", [x, "q1"], [out])], _scalar("alpha", 1.702)
    raise ValueError(kind)


EXPECTED = {"relu": "relu", "gelu-op": "gelu", "gelu-op-tanh": "gelu_tanh", "gelu-erf": "gelu",
            "gelu-tanh": "gelu_tanh", "silu": "silu", "quick_gelu": "quick_gelu"}


def ffn(kind, *, gated=False, bias=False, opset=20):
    nodes = [helper.make_node("MatMul", ["X", "Wg" if gated else "Wu"], ["g0"], name="gate" if gated else "up")]
    inits = {"Wg" if gated else "Wu": weights(H, I, seed=1), "Wd": weights(I, H, seed=3)}
    act_in = "g0"
    if bias:
        nodes.append(helper.make_node("Add", ["g0", "bg"], ["g1"]))
        inits["bg"] = weights(I, seed=4)
        act_in = "g1"
    act, consts = activation_nodes(kind, act_in, "a")
    nodes += act
    inits.update(consts)
    hidden = "a"
    if gated:
        nodes += [helper.make_node("MatMul", ["X", "Wu"], ["u"], name="up"), helper.make_node("Mul", ["a", "u"], ["h"])]
        inits["Wu"] = weights(H, I, seed=2)
        hidden = "h"
    nodes.append(helper.make_node("MatMul", [hidden, "Wd"], ["Y"], name="down"))
    return make_model(nodes, [("X", FLOAT, [5, H])], [("Y", FLOAT, [5, H])], inits, opset=opset), inits


@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("gated", [False, True])
def test_ffn_activation_and_roles_from_every_decomposition(tmp_path, kind, gated):
    proto, inits = ffn(kind, gated=gated, bias=not gated)
    model = ir.serde.deserialize_model(proto)
    block = match_ffn_block(next(n for n in model.graph if n.name == "down"))
    assert block, block
    assert block.activation == EXPECTED[kind] and block.hidden == I and block.glu == gated
    assert block.up.weight.name == "Wu" and (block.gate.weight.name if gated else None) == ("Wg" if gated else None)
    assert (block.up_bias.name if not gated else block.gate_bias) == ("bg" if not gated else None)
    if gated:
        assert block.kind == {"silu": "swiglu", "relu": "reglu"}.get(EXPECTED[kind], block.kind)
    # The reported activation is what the graph computes.
    x = weights(5, H, seed=9)
    first = x @ (inits["Wg"] if gated else inits["Wu"]) + (inits["bg"] if not gated else 0)
    hidden = ACTIVATIONS[EXPECTED[kind]](first.astype(np.float64))
    if gated:
        hidden = hidden * (x @ inits["Wu"])
    (got,) = run_ort(save(proto, tmp_path / "ffn.onnx"), {"X": x})
    np.testing.assert_allclose(got, hidden @ inits["Wd"], rtol=2e-4, atol=2e-4)


def test_ffn_that_is_not_one():
    proto, _ = ffn("relu")
    model = ir.serde.deserialize_model(proto)
    failure = match_ffn_block(next(n for n in model.graph if n.name == "up"))
    assert not failure and failure.code == Code.NOT_A_REGION and "graph input" in failure.message


def test_ffn_blocks_of_real_exports(zoo_path):
    minilm = load_model(zoo_path("minilm")).model
    blocks = [b for n in minilm.graph if n.op_type == "MatMul" for b in [match_ffn_block(n)] if b]
    assert len(blocks) == 6 and {b.kind for b in blocks} == {"gelu"} and {b.hidden for b in blocks} == {1536}
    assert all(b.up_bias is not None and b.down_bias is not None for b in blocks)
    assert "intermediate" in blocks[0].up.label and "output" in blocks[0].down.label
    llama = load_model(zoo_path("tiny-llama")).model
    blocks = [b for n in llama.graph if n.op_type == "MatMul" for b in [match_ffn_block(n)] if b]
    assert [b.kind for b in blocks] == ["swiglu", "swiglu"]
    assert "gate_proj" in blocks[0].gate.label and "up_proj" in blocks[0].up.label and "down_proj" in blocks[0].down.label


def test_attention_blocks_of_real_exports(zoo_path):
    minilm = load_model(zoo_path("minilm")).model
    blocks = [b for n in minilm.graph if n.op_type == "MatMul" for b in [match_attention_block(n, minilm)] if b]
    assert len(blocks) == 6
    b = blocks[0]
    assert (b.heads, b.kv_heads, b.head_dim, b.rotary, b.past_key) == (12, 12, 32, None, None)
    assert ["query" in b.q.site.label, "key" in b.k.site.label, "value" in b.v.site.label] == [True] * 3
    assert b.mask is not None and b.softmax is not None and b.scores is not None and b.context is not None

    llama = load_model(zoo_path("tiny-llama")).model
    blocks = [b for n in llama.graph if n.op_type == "MatMul" for b in [match_attention_block(n, llama)] if b]
    b = blocks[0]
    assert len(blocks) == 2 and (b.heads, b.kv_heads, b.group, b.head_dim) == (4, 2, 2, 16)
    assert ["q_proj" in b.q.site.label, "k_proj" in b.k.site.label, "v_proj" in b.v.site.label] == [True] * 3
    assert b.rotary is not None and b.mask is not None and b.past_key is None

    kv = load_model(zoo_path("tiny-llama-kv")).model
    blocks = [b for n in kv.graph if n.op_type == "MatMul" for b in [match_attention_block(n, kv)] if b]
    names = [(b.past_key.name, b.past_value.name, b.present_key.name, b.present_value.name) for b in blocks]
    assert names == [(f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key",
                      f"present.{i}.value") for i in range(2)]
