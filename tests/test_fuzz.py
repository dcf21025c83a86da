"""Property tests on generated graphs (Hypothesis).

Generated models stack MatMul / Gemm / Conv layers, activations, FFN blocks with residuals and
attention blocks, with random sizes, dtypes (float32 / float16) and opsets. Properties:

* every pass leaves a model that onnx.checker (full) accepts and ONNX Runtime runs, with finite
  outputs, and records every site it looked at as changed or skipped with a code;
* ``compress`` is exact: the compressed model's outputs equal the pruned model's bit for bit;
* structured passes are exact given their masks: removing units equals zeroing their exit weights.

CI runs a few dozen examples; ``SPARSEC_FUZZ_EXAMPLES=2000`` runs the long campaign
(docs/reliability.md records its counts).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from sparsec.model_io import load_model, save_model
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.verify import verify_models
from tests.helpers import make_model

EXAMPLES = int(os.environ.get("SPARSEC_FUZZ_EXAMPLES", "25"))
# The default run draws the same examples every time (so the counts below are stable); a long
# campaign with SPARSEC_FUZZ_EXAMPLES draws new ones.
DERANDOMIZE = "SPARSEC_FUZZ_EXAMPLES" not in os.environ
ACTIVATIONS = ["Relu", "Gelu", "Tanh", "Sigmoid", "SiLU"]


@st.composite
def models(draw, families=("dense", "sequence", "conv")):
    """A random 2-D (MatMul/Gemm/FFN), 3-D (FFN/attention) or 4-D (Conv) model."""
    family = draw(st.sampled_from(list(families)))
    dtype = draw(st.sampled_from([np.float32, np.float16])) if family != "conv" else np.float32
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    opset = draw(st.integers(13, 21))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    inits, nodes = {}, []
    n = [0]

    def w(*shape):
        n[0] += 1
        name = f"w{n[0]}"
        array = rng.standard_normal(shape).astype(dtype) * np.asarray(shape[0] ** -0.5, dtype)
        if draw(st.booleans()):
            array[rng.random(shape) < 0.3] = 0  # partly sparse already
        inits[name] = array
        return name

    def act(x):
        kind = draw(st.sampled_from(ACTIVATIONS if opset >= 20 else [a for a in ACTIVATIONS if a != "Gelu"]))
        y = f"a{len(nodes)}"
        if kind == "SiLU":
            nodes.extend([helper.make_node("Sigmoid", [x], [y + "s"]), helper.make_node("Mul", [x, y + "s"], [y])])
        else:
            nodes.append(helper.make_node(kind, [x], [y]))
        return y

    x, width = "X", draw(st.sampled_from([16, 32, 48, 64]))
    if family == "conv":
        channels = draw(st.sampled_from([8, 16, 32]))
        x_shape, cur = [1, channels, 6, 6], channels
        for _ in range(draw(st.integers(1, 3))):
            out_ch = draw(st.sampled_from([8, 16, 32]))
            y = f"c{len(nodes)}"
            nodes.append(helper.make_node("Conv", [x, w(out_ch, cur, 3, 3)], [y], pads=[1, 1, 1, 1]))
            x, cur = act(y), out_ch
        out_shape = [1, cur, 6, 6]
    else:
        x_shape = ["B", width] if family == "dense" else ["B", 5, width]
        for _ in range(draw(st.integers(1, 3))):
            block = draw(st.sampled_from(["linear", "ffn"] + (["gemm"] if family == "dense" else ["attention"])))
            if block == "linear":
                y = f"l{len(nodes)}"
                nodes.append(helper.make_node("MatMul", [x, w(width, width)], [y]))
                x = act(y)
            elif block == "gemm":
                y = f"g{len(nodes)}"
                trans = draw(st.booleans())
                nodes.append(helper.make_node("Gemm", [x, w(width, width)], [y], transB=int(trans)))
                x = act(y)
            elif block == "ffn":
                hidden = draw(st.sampled_from([32, 64, 96]))
                h, y, r = f"h{len(nodes)}", f"f{len(nodes)}", f"r{len(nodes)}"
                nodes.append(helper.make_node("MatMul", [x, w(width, hidden)], [h]))
                a = act(h)
                nodes.append(helper.make_node("MatMul", [a, w(hidden, width)], [y]))
                nodes.append(helper.make_node("Add", [y, x], [r]))
                x = r
            else:
                heads = draw(st.sampled_from([h for h in (2, 4, 8) if width % h == 0]))
                d = width // heads
                shape_in = f"s{len(nodes)}"
                inits[shape_in] = np.array([0, 0, -1, d], np.int64)
                inits[shape_in + "o"] = np.array([0, 0, width], np.int64)
                inits[shape_in + "k"] = np.asarray(d ** -0.5, dtype)
                parts = []
                for p in "qkv":
                    t = f"{p}{len(nodes)}"
                    nodes += [helper.make_node("MatMul", [x, w(width, width)], [t + "m"]),
                              helper.make_node("Reshape", [t + "m", shape_in], [t + "r"]),
                              helper.make_node("Transpose", [t + "r"], [t], perm=[0, 2, 1, 3])]
                    parts.append(t)
                q, k, v = parts
                o = f"o{len(nodes)}"
                nodes += [helper.make_node("Transpose", [k], [k + "T"], perm=[0, 1, 3, 2]),
                          helper.make_node("MatMul", [q, k + "T"], [o + "s"]),
                          helper.make_node("Mul", [o + "s", shape_in + "k"], [o + "c"]),
                          helper.make_node("Softmax", [o + "c"], [o + "p"], axis=-1),
                          helper.make_node("MatMul", [o + "p", v], [o + "a"]),
                          helper.make_node("Transpose", [o + "a"], [o + "t"], perm=[0, 2, 1, 3]),
                          helper.make_node("Reshape", [o + "t", shape_in + "o"], [o + "r"]),
                          helper.make_node("MatMul", [o + "r", w(width, width)], [o + "y"]),
                          helper.make_node("Add", [o + "y", x], [o])]
                x = o
        out_shape = x_shape
    nodes.append(helper.make_node("Identity", [x], ["Y"]))
    for i, node in enumerate(nodes):
        node.name = f"n{i}"
    return make_model(nodes, [("X", tp, x_shape)], [("Y", tp, out_shape)], inits, opset=opset)


SPECS = ["nm:min_params=0", "nm:n=1,m=4,min_params=0", "unstructured:sparsity=0.7,min_params=0",
         "block:rows=4,cols=4,min_params=0", "ffn-neurons:ratio=0.5,multiple=1", "attention-heads:ratio=0.5",
         "conv-channels:ratio=0.5,multiple=1"]
FEEDS = [{"B": 3}]


def _run(proto, spec, tmp):
    src = tmp / "src.onnx"
    onnx.save(proto, str(src))
    loaded = load_model(src)
    records = run_passes(loaded.model, parse_pass_specs(spec), PassContext())
    out = save_model(loaded.model, tmp / "out.onnx", external_data=True)
    return src, out, records


def test_every_pass_leaves_a_valid_running_model(tmp_path_factory):
    changed = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=DERANDOMIZE)
    @given(proto=models(), spec=st.sampled_from(SPECS))
    def check(proto, spec):
        tmp = tmp_path_factory.mktemp("fuzz")
        src, out, records = _run(proto, spec, tmp)
        for record in records:
            assert all(s.action == "changed" or s.code for s in record.sites)
            event(f"{record.pass_id}: {'changed' if record.changed else 'nothing matched'}")
            changed.extend(record.changed)
        onnx.checker.check_model(str(out), full_check=True)
        from sparsec.feeds import input_specs, random_feeds

        feeds = random_feeds(input_specs(load_model(src).model), samples=1, dims=FEEDS[0])
        verdict = verify_models(src, out, feeds, exact=False)
        assert verdict.outputs and all(o.nonfinite == 0 and not o.error for o in verdict.outputs)

    check()
    assert len(changed) >= EXAMPLES // 5, "the generated models rarely gave the passes anything to change"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=DERANDOMIZE)
@given(proto=models(), spec=st.sampled_from(SPECS[:4]))
def test_compress_is_bit_exact(tmp_path_factory, proto, spec):
    tmp = tmp_path_factory.mktemp("fuzz")
    _, pruned, _ = _run(proto, spec, tmp)
    model = load_model(pruned).model
    (record,) = run_passes(model, parse_pass_specs("compress"), PassContext())
    event(f"compress: {len(record.changed)} weight(s) packed")
    packed = save_model(model, tmp / "packed.onnx", external_data=True)
    onnx.checker.check_model(str(packed), full_check=True)
    from sparsec.feeds import input_specs, random_feeds

    feeds = random_feeds(input_specs(model), samples=1, dims=FEEDS[0])
    verdict = verify_models(pruned, packed, feeds, atol=0, rtol=0)
    assert verdict.passed, verdict.lines()


@st.composite
def structured_cases(draw):
    """A structured pass spec and a model of a family it can match."""
    spec = draw(st.sampled_from(SPECS[4:]))
    families = {"ffn-neurons": ("dense", "sequence"), "attention-heads": ("sequence",),
                "conv-channels": ("conv",)}[spec.split(":")[0]]
    return draw(models(families)), spec


def test_structured_removal_equals_masking(tmp_path_factory):
    from sparsec.passes import structured_patterns as sp
    from tests.test_structured import masked_reference

    regions = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=DERANDOMIZE)
    @given(case=structured_cases())
    def check(case):
        proto, spec = case
        tmp = tmp_path_factory.mktemp("fuzz")
        src, out, (record,) = _run(proto, spec, tmp)
        event(f"{record.pass_id}: {len(record.changed)} region(s) changed")
        if not record.changed:
            return  # counted below: most examples must give a structured pass a region
        regions.extend(record.changed)
        match = {"ffn-neurons": sp.match_ffn, "attention-heads": sp.match_attention,
                 "conv-channels": sp.match_conv_channels}[record.pass_id]
        reference = masked_reference(src, record, match, tmp)
        from sparsec.feeds import input_specs, random_feeds

        feeds = random_feeds(input_specs(load_model(src).model), samples=1, dims=FEEDS[0])
        is_half = proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        # Removing units and zeroing them sum the same products in another order: fp16 needs
        # its own tolerance; fp32 is held to the default (1e-5 / 1e-4).
        verdict = verify_models(reference, out, feeds, atol=5e-2 if is_half else None,
                                rtol=5e-2 if is_half else None)
        assert verdict.passed, verdict.lines()

    check()
    assert len(regions) >= EXAMPLES // 5, "the generated models rarely gave a structured pass a region"
