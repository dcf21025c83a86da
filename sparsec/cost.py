"""The cost model: predicted latency of a graph, node by node, on a target.

Every node gets its floating-point work and the bytes it moves, from the shapes the model really
has on a workload (one ONNX Runtime run with every intermediate value exposed), and a time:

    t(node) = overhead + max(flops / gemm_rate(flops), bytes / bandwidth)      linear algebra
    t(node) = overhead + bytes / bandwidth                                     everything else

``gemm_rate`` (FLOP/s as a function of a product's size), ``bandwidth`` (per operator where one
was measured: a layer norm moves its bytes 16x slower than an Add on the CPU here) and the
per-node ``overhead`` come from a :class:`Profile`: measured on the machine at hand by ``sparsec
calibrate`` (micro-benchmarks: products of several sizes, a large element-wise op, single
operators, GroupQueryAttention, a chain of tiny ops), or, without one, from the target's
published peaks times default efficiencies (the plan says which). An integer product's
quantization and scaling nodes, which ONNX Runtime fuses into it, take no time of their own:
the product's quantized rate covers them (:func:`fused_into_products`). The kernel facts of the registry correct what a
roofline cannot know: on the CPU provider a GroupQueryAttention window or a SparseAttention
layout computes every causal score (the kernels mask, they do not skip); SparseAttention on the
CPU runs 1.6x slower than GroupQueryAttention.

Predictions are used as ratios (original against candidate, same workload, same profile):
what a rewrite saves, not absolute times.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

GEMM_OPS = {"MatMul", "Gemm", "Conv", "MatMulInteger", "MatMulNBits", "FusedMatMul", "ConvTranspose",
            "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
# The quantized products and the form whose measured rate they run at (Profile.quantized).
QUANTIZED_OPS = {"MatMulInteger": "int8-dynamic", "DynamicQuantizeMatMul": "int8-dynamic",
                 "MatMulIntegerToFloat": "int8-dynamic", "MatMulNBits": "int4"}
ATTENTION_OPS = {"GroupQueryAttention", "SparseAttention", "MultiHeadAttention", "Attention"}
CPU = "CPUExecutionProvider"
# What the CPU provider's attention kernels really compute: a window or a layout is masked, not
# skipped (docs/measurements/ort-1.32-cpu-kernels.md: 0.86-1.0x), and SparseAttention runs 1.6x
# slower than GroupQueryAttention on the same layout.
CPU_ATTENTION_SLOWDOWN = {"SparseAttention": 1.6}


@dataclass
class NodeCost:
    name: str
    op: str
    flops: float
    bytes: float
    kind: str  # gemm | attention | memory | fused (part of a quantized product: no time of its own)
    form: str = ""  # a quantized product's form ("int8-dynamic", "int4"): its own measured rate

    def seconds(self, profile: Profile) -> float:
        if self.kind == "fused":
            return 0.0
        memory = self.bytes / profile.memory_rate(self.op, self.bytes)
        if self.kind == "memory":
            return profile.overhead + memory
        rate = profile.attention_rate(self.flops, self.op) if self.kind == "attention" else \
            profile.gemm_rate(self.flops, self.form)
        return profile.overhead + max(self.flops / rate, memory)


@dataclass
class Profile:
    """How fast a machine runs products, memory traffic and nodes."""

    name: str
    gemm: list[tuple[float, float]]  # (flops of one product, FLOP/s reached), sorted by flops
    bandwidth: float  # bytes/s of a large element-wise op
    overhead: float  # seconds per node
    source: str  # "measured on <host> (sparsec calibrate)" or "published peaks x default efficiencies"
    threads: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    # a quantized form's products, as ``gemm`` (measured by `sparsec calibrate` on the CPU);
    # a form without its own rates runs at the float rate
    quantized: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    # (bytes moved, bytes/s) of an operator whose kernel is slower than a large element-wise Add
    # (a layer norm, which ONNX Runtime fuses with the residual Add before it: 16x on the CPU
    # here), measured at a small encoder's and a small decoder's sizes by `sparsec calibrate` on
    # the CPU, sorted by bytes
    op_bandwidth: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    # GroupQueryAttention's FLOP/s on causal prompts of several lengths, as ``gemm`` (measured by
    # `sparsec calibrate` on the CPU: 6x slower than products there); SparseAttention runs at
    # it too (times CPU_ATTENTION_SLOWDOWN); without it, attention runs at the product rate
    attention: list[tuple[float, float]] = field(default_factory=list)

    def gemm_rate(self, flops: float, form: str = "") -> float:
        """FLOP/s at this size: log-linear interpolation between the measured sizes."""
        return _interpolate(self.quantized.get(form) or self.gemm, flops)

    def memory_rate(self, op: str, nbytes: float) -> float:
        """Bytes/s of a node of ``op`` moving ``nbytes``: log-linear between the operator's
        measured sizes, its nearest one outside them; the large Add's bandwidth without any."""
        points = self.op_bandwidth.get(op)
        if not points:
            return self.bandwidth
        if nbytes <= points[0][0]:
            return points[0][1]
        if nbytes >= points[-1][0]:
            return points[-1][1]
        return _interpolate(points, nbytes)

    def attention_rate(self, flops: float, op: str) -> float:
        """FLOP/s of an attention node of ``op`` at this size."""
        if self.attention and op in MEASURED_ATTENTION:
            return _interpolate(self.attention, flops)
        return self.gemm_rate(flops)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """A short hash of every rate: two calibrations of one machine differ here, not in
        ``source`` (the planner's cached savings depend on the rates)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        data = dict(data)
        data["gemm"] = [tuple(p) for p in data["gemm"]]
        data["quantized"] = {form: [tuple(p) for p in points] for form, points in data.get("quantized", {}).items()}
        # profiles measured before operators had rates of their own, or one rate each
        data["op_bandwidth"] = {op: [tuple(p) for p in rates] if isinstance(rates, list) else [(0.0, rates)]
                                for op, rates in data.get("op_bandwidth", {}).items()}
        data["attention"] = [tuple(p) for p in data.get("attention", [])]  # ... or attention
        return cls(**data)


# The attention kernels whose rate `sparsec calibrate` measures (on GroupQueryAttention).
MEASURED_ATTENTION = {"GroupQueryAttention", "SparseAttention"}


def _interpolate(points: list[tuple[float, float]], size: float) -> float:
    """The rate at ``size`` from (size, rate) points sorted by size: log-linear between the
    measured sizes; below them less efficient, above them the largest one's."""
    if size <= points[0][0]:
        return points[0][1] * max(size / points[0][0], 1e-3) ** 0.5  # smaller: less efficient
    if size >= points[-1][0]:
        return points[-1][1]
    for (f0, r0), (f1, r1) in zip(points, points[1:]):
        if f0 <= size <= f1:
            w = (math.log(size) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return math.exp(math.log(r0) * (1 - w) + math.log(r1) * w)
    return points[-1][1]


def profile_dir() -> Path:
    return Path(os.environ.get("SPARSEC_CACHE") or Path.home() / ".cache" / "sparsec") / "profiles"


def profile_path(target: str) -> Path:
    return profile_dir() / f"{target}-{platform.node() or 'host'}.json"


def load_profile(target) -> Profile:
    """The measured profile of ``target``: this host's, else one copied from the machine that
    runs the model (``profiles/<target>.json``), else one from the target's published peaks."""
    for path in (profile_path(target.name), profile_dir() / f"{target.name}.json"):
        if path.exists():
            return Profile.from_dict(json.loads(path.read_text()))
    return published_profile(target)


def published_profile(target) -> Profile:
    """A profile from the target's hardware facts (peak FLOP/s, bandwidth) times default
    efficiencies: half the peak for large products, a quarter at 1 MFLOP, 60% of the bandwidth."""
    hw = target.hardware or {}
    peak = float(hw.get("peak_flops", {}).get("fp32", 1e11))
    bandwidth = float(hw.get("bandwidth", 2e10))
    overhead = float(hw.get("node_overhead", 5e-6))
    return Profile(target.name, [(1e6, peak * 0.1), (1e8, peak * 0.3), (1e10, peak * 0.5)], bandwidth * 0.6,
                   overhead, f"published peaks of '{target.name}' x default efficiencies (run `sparsec calibrate"
                   f" --target {target.name}` on the machine to measure them)")


# --- costs -------------------------------------------------------------------------------------

def _bytes(shape, itemsize: int) -> float:
    return float(np.prod(shape)) * itemsize if shape is not None else 0.0


def _attention_flops(node, shapes: Mapping[str, tuple], provider: str) -> float:
    """4 * B * N * S * T_eff * H for the attention ops (scores and context)."""
    q = shapes.get(node.inputs[0].name) if node.inputs[0] is not None else None
    if q is None or len(q) < 3:
        return 0.0
    attrs = {k: a.value for k, a in node.attributes.items()}
    heads = int(attrs.get("num_heads", 1))
    b, s = q[0], q[1] if len(q) == 3 else q[2]
    width = q[-1] if len(q) == 3 else q[1] * q[3]
    head = width // heads if len(q) == 3 else q[3]
    total = s
    if node.op_type in ("GroupQueryAttention", "SparseAttention"):
        key = shapes.get(node.inputs[3].name) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        total = max(s, key[2]) if key is not None and node.op_type == "SparseAttention" else \
            s + (key[2] if key is not None else 0)
    causal = node.op_type in ("GroupQueryAttention", "SparseAttention") or int(attrs.get("unidirectional", 0))
    keys = (total - s) + (s + 1) / 2 if causal else total  # average keys per query
    window = int(attrs.get("local_window_size", -1))
    if window > 0 and provider != CPU:  # the CPU kernel computes the window's scores and masks
        keys = min(keys, window)
    flops = 4.0 * b * heads * s * keys * head
    if provider == CPU:
        flops *= CPU_ATTENTION_SLOWDOWN.get(node.op_type, 1.0)
    return flops


def fused_into_products(model) -> dict[int, str]:
    """The nodes that ONNX Runtime runs inside an integer product (id(node) -> the product's
    form): the DynamicQuantizeLinear of its input, the product of the two scales, and the Cast
    and scale Mul after it (DynamicQuantizeMatMul, MatMulIntegerToFloat). A form's rate is
    measured over that whole chain (:func:`calibrate`), so they take no time of their own. A
    DynamicQuantizeLinear shared by several products (a layer's Q, K and V) is then counted in
    each: 2 extra quantizations of the input per layer, about 2% of a quantized MiniLM."""
    fused = {}
    for node in model.graph:
        if node.op_type != "MatMulInteger":
            continue
        form = QUANTIZED_OPS[node.op_type]
        quantize = node.inputs[0].producer() if node.inputs[0] is not None else None
        if quantize is not None and quantize.op_type == "DynamicQuantizeLinear":
            fused[id(quantize)] = form
            fused.update((id(use.node), form) for use in quantize.outputs[1].uses() if use.node.op_type == "Mul")
        for use in node.outputs[0].uses():
            if use.node.op_type == "Cast":
                fused[id(use.node)] = form
                fused.update((id(after.node), form) for after in use.node.outputs[0].uses()
                             if after.node.op_type == "Mul")
    return fused


def graph_costs(model, shapes: Mapping[str, tuple], itemsizes: Mapping[str, int],
                provider: str = CPU) -> list[NodeCost]:
    """The cost of every node of ``model`` (an onnx_ir Model) given its values' shapes."""
    costs = []
    fused = fused_into_products(model)
    for node in model.graph:
        if id(node) in fused:
            costs.append(NodeCost(node.name or node.op_type, node.op_type, 0.0, 0.0, "fused", fused[id(node)]))
            continue
        inputs = [v for v in node.inputs if v is not None]
        moved = sum(_bytes(shapes.get(v.name), itemsizes.get(v.name, 4)) for v in inputs)
        moved += sum(_bytes(shapes.get(v.name), itemsizes.get(v.name, 4)) for v in node.outputs)
        op, flops, kind = node.op_type, 0.0, "memory"
        out = shapes.get(node.outputs[0].name) if node.outputs else None
        if op in GEMM_OPS and out is not None and inputs:
            kind = "gemm"
            a = shapes.get(inputs[0].name)
            if op in ("MatMul", "MatMulInteger", "FusedMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") \
                    and a is not None:
                flops = 2.0 * float(np.prod(out)) * a[-1]
            elif op == "Gemm" and a is not None:
                trans = node.attributes.get("transA")
                k = a[0] if trans is not None and int(trans.value) else a[-1]
                flops = 2.0 * float(np.prod(out)) * k
            elif op in ("Conv", "ConvTranspose") and len(inputs) > 1:
                w = inputs[1].shape if inputs[1].shape is not None else shapes.get(inputs[1].name)
                if w is not None:
                    flops = 2.0 * float(np.prod(out)) * float(np.prod(tuple(w)[1:]))
            elif op == "MatMulNBits" and a is not None:
                flops = 2.0 * float(np.prod(out)) * a[-1]
        elif op in ATTENTION_OPS:
            kind, flops = "attention", _attention_flops(node, shapes, provider)
        elif op in ("MoE", "QMoE") and out is not None:
            kind = "gemm"
            k = int(node.attributes["k"].value) if "k" in node.attributes else 1
            fc1 = inputs[2].shape if len(inputs) > 2 and inputs[2].shape is not None else None
            if fc1 is not None:
                tokens = float(np.prod(out[:-1]))
                flops = 2.0 * tokens * k * (fc1[1] * fc1[2] + fc1[2] * fc1[1] / (2 if "swiglu" in str(
                    node.attributes.get("activation_type").value if "activation_type" in node.attributes else "")
                    else 1))
        costs.append(NodeCost(node.name or op, op, flops, moved, kind, QUANTIZED_OPS.get(op, "")))
    return costs


def observed_shapes(path: str | os.PathLike, feed: Mapping[str, np.ndarray], runner=None
                    ) -> tuple[dict[str, tuple], dict[str, int]]:
    """(shape, itemsize) of every value of the model at ``path`` on ``feed`` (see :func:`_observe`)."""
    shapes, sizes, _ = _observe(path, feed, runner)
    return shapes, sizes


def _observe(path: str | os.PathLike, feed: Mapping[str, np.ndarray], runner=None):
    """(shapes, itemsizes, the model as an onnx_ir Model) of the model at ``path`` on ``feed``,
    read from disk once: one ORT run with every node output exposed (types from ONNX shape
    inference; a contrib op's outputs take its first input's type), the graph optimizer off so
    the values are the graph's own."""
    import onnx
    import onnx_ir as ir
    from onnx import helper

    from sparsec.runtime.kvcache import KVCache
    from sparsec.runtime.session import cpu_runner, create_session

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    model = ir.serde.deserialize_model(proto)  # taken before the exposed outputs are added below
    graph = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)
             if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in graph.initializer})
    shown = {o.name for o in graph.output}
    for node in graph.node:
        for name in node.output:
            if not name or name in shown:
                continue
            elem = types.get(name) or next((types[i] for i in node.input if i in types), None)
            if elem:
                graph.output.append(helper.make_tensor_value_info(name, elem, None))
                shown.add(name)
    runner = runner or cpu_runner()
    with tempfile.TemporaryDirectory(prefix="sparsec-cost-") as tmp:
        exposed = Path(tmp) / "exposed.onnx"
        onnx.save_model(proto, str(exposed), save_as_external_data=True, location="exposed.onnx.data")
        session = create_session(exposed, providers=(CPU,), optimize=False)
        inputs, shared = KVCache.of_session(session).feed(feed, session.get_inputs())
        values = runner.run(session, inputs, shared=shared)
        del session
    arrays = {**values, **inputs}
    shapes = {k: tuple(v.shape) for k, v in arrays.items() if isinstance(v, np.ndarray)}
    sizes = {k: v.dtype.itemsize for k, v in arrays.items() if isinstance(v, np.ndarray)}
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
        sizes[init.name] = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return shapes, sizes, model


@dataclass
class Prediction:
    seconds: float
    nodes: list[tuple[NodeCost, float]]

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for cost, t in self.nodes:
            out[cost.kind] = out.get(cost.kind, 0.0) + t
        return out


def predict(path: str | os.PathLike, feed: Mapping[str, np.ndarray], profile: Profile,
            provider: str = CPU) -> Prediction:
    """Predicted latency of the model at ``path`` on ``feed``."""
    shapes, sizes, model = _observe(path, feed)
    costs = graph_costs(model, shapes, sizes, provider)
    timed = [(c, c.seconds(profile)) for c in costs]
    return Prediction(sum(t for _, t in timed), timed)


# --- size and memory ---------------------------------------------------------------------------

OBJECTIVES = ("latency", "size", "memory")


@dataclass
class Footprint:
    """What a model occupies: on disk, and in memory while it runs on one workload."""

    file_bytes: int  # the .onnx file and its external data
    weight_bytes: int  # constants as ONNX Runtime holds them (a compressed weight: rebuilt, dense)
    activation_bytes: int  # the most bytes of values alive at once, nodes run in graph order

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def file_bytes(path: str | os.PathLike) -> int:
    """The model file and the external data files it references."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in proto.graph.initializer for entry in t.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def footprint(path: str | os.PathLike, feed: Mapping[str, np.ndarray]) -> Footprint:
    """The :class:`Footprint` of the model at ``path`` on ``feed``. Activations: every value is
    allocated when its node runs and freed after its last reader (graph outputs stay), as ORT's
    memory planner reuses buffers; the subgraphs that rebuild compressed weights count as the
    weights they fold into."""
    from sparsec.graph import is_packed_part

    shapes, sizes, model = _observe(path, feed)
    graph = model.graph

    def nbytes(name: str) -> int:
        shape = shapes.get(name)
        return int(np.prod(shape, dtype=np.int64)) * sizes.get(name, 4) if shape is not None else 0

    nodes = list(graph)
    folded = {id(n) for n in nodes if is_packed_part(n)}
    weights = sum(nbytes(v.name) for v in graph.initializers.values()
                  if not all(id(u.node) in folded for u in v.uses()) or not list(v.uses()))
    weights += sum(nbytes(o.name) for n in nodes if id(n) in folded for o in n.outputs
                   if any(id(u.node) not in folded for u in o.uses()) or o in graph.outputs)
    outputs = {v.name for v in graph.outputs}
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for v in node.inputs:
            if v is not None:
                last_use[v.name] = i
    live = {v.name: nbytes(v.name) for v in graph.inputs}
    peak = sum(live.values())
    for i, node in enumerate(nodes):
        if id(node) in folded:
            continue
        live.update({o.name: nbytes(o.name) for o in node.outputs if o.name})
        peak = max(peak, sum(live.values()))
        dead = [v for v in node.inputs if v is not None and last_use.get(v.name) == i]
        dead += [o for o in node.outputs if o.name not in last_use]  # read by nobody
        for v in dead:
            if v.name in live and v.name not in outputs:
                del live[v.name]
    return Footprint(file_bytes(path), int(weights), int(peak))


# --- calibration -------------------------------------------------------------------------------

GEMM_SIZES = ((1, 576, 1536), (16, 384, 1536), (128, 384, 1536), (512, 384, 1536), (2048, 384, 1536),
              (2048, 1536, 384), (512, 576, 1536), (2048, 1024, 4096))
GPU_GEMM_SIZES = GEMM_SIZES + ((4096, 4096, 4096), (8192, 8192, 8192))  # where a GPU reaches its peak
CUDA = "CUDAExecutionProvider"


def _single_node(op: str, inputs: dict[str, tuple], attrs=None, consts: dict[str, np.ndarray] | None = None,
                 chain: int = 1, elem: int = 1) -> bytes:
    from onnx import helper, numpy_helper

    names = list(inputs)
    nodes, last = [], None
    for i in range(chain):
        ins = names if i == 0 else [last, names[1]]
        last = f"y{i}"
        nodes.append(helper.make_node(op, ins, [last], **(attrs or {})))
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()
                         if not consts or n not in consts],
        [helper.make_tensor_value_info(last, elem, None)],
        [numpy_helper.from_array(a, n) for n, a in (consts or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model.SerializeToString()


def measuring_runner(target, threads: int | None = None):
    """The runner ``sparsec calibrate`` measures ``target`` with: its first provider among CUDA
    and CPU (TensorRT builds engines of its own; its profile is not measured), or None when this
    onnxruntime build lacks it."""
    from sparsec.runtime.session import Runner, available_providers

    wanted = next((p for p in target.provider_names if p in (CUDA, CPU)), CPU)
    if wanted not in available_providers():
        return None
    return Runner((wanted,) if wanted == CPU else (wanted, CPU), threads)


def calibrate(target, threads: int | None = None, progress=None) -> Profile:
    """Measure this machine on the target's provider (:func:`measuring_runner`): products of
    several sizes, a large element-wise Add, and a chain of 64 tiny Adds (the per-node
    overhead); on the CPU also the quantized products, single operators and GroupQueryAttention.
    On a GPU in fp16 (what GPU targets deploy), inputs and outputs on the device. Every probe is timed
    interleaved with the others (:func:`sparsec.runtime.bench.interleaved_medians`), on sessions
    that do not spin-wait, as :func:`~sparsec.runtime.bench.compare_speed` times models."""
    from sparsec.errors import InputError
    from sparsec.runtime.bench import interleaved_medians, timed_calls

    runner = measuring_runner(target, threads)
    if runner is None:
        raise InputError(f"target '{target.name}' runs on {target.provider_names[0]}, which this onnxruntime build"
                         f" lacks: run `sparsec calibrate --target {target.name}` on the machine with the GPU and copy"
                         f" the profile it writes to {profile_dir() / (target.name + '.json')} here")
    dtype, elem = (np.float16, 10) if runner.on_gpu else (np.float32, 1)
    threads = threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)

    sizes = GPU_GEMM_SIZES if runner.on_gpu else GEMM_SIZES
    probes = []
    for m, k, n in sizes:
        weight = rng.standard_normal((k, n)).astype(dtype)
        probes.append((_single_node("MatMul", {"x": [m, k], "w": [k, n]}, consts={"w": weight}, elem=elem),
                       {"x": rng.standard_normal((m, k)).astype(dtype)}))
    size, chain = 1 << (26 if runner.on_gpu else 22), 64
    probes.append((_single_node("Add", {"a": [size], "b": [size]}, elem=elem),
                   {"a": np.ones(size, dtype), "b": np.ones(size, dtype)}))
    probes.append((_single_node("Add", {"a": [1], "b": [1]}, chain=chain, elem=elem),
                   {"a": np.ones(1, dtype), "b": np.ones(1, dtype)}))
    with tempfile.TemporaryDirectory(prefix="sparsec-calibrate-") as tmp:
        quantized = {} if runner.on_gpu else \
            {form: _quantized_probes(spec, rng, Path(tmp) / form) for form, spec in QUANTIZED_FORMS.items()}
        operators = {} if runner.on_gpu else _operator_probes(rng, Path(tmp))
        attention = [] if runner.on_gpu else _attention_probes(rng, Path(tmp))
    probes += [(p.model, p.feed) for group in (*quantized.values(), *operators.values(), attention) for p in group]
    sessions = [runner.session(model, threads=threads, spin=False) for model, _ in probes]  # as models are timed
    times = interleaved_medians([timed_calls(runner, {0: session}, feed, {})[0]
                                 for session, (_, feed) in zip(sessions, probes)])
    del sessions
    gemm = sorted((2.0 * m * k * n, 2.0 * m * k * n / t) for (m, k, n), t in zip(sizes, times))
    bandwidth = 3 * size * np.dtype(dtype).itemsize / times[len(sizes)]
    overhead = times[len(sizes) + 1] / chain
    where = f"{runner.provider_names[0]}, {np.dtype(dtype).name}" if runner.on_gpu else \
        f"{platform.machine()}, {threads} threads"
    profile = Profile(target.name, gemm, bandwidth, overhead,
                      f"measured on {platform.node() or 'this host'} ({where}) by `sparsec calibrate`", threads,
                      {"processor": platform.processor(), "time": time.strftime("%Y-%m-%d %H:%M"),
                       "provider": runner.provider_names[0], "dtype": np.dtype(dtype).name})
    rest = iter(times[len(sizes) + 2:])
    for form, form_probes in quantized.items():  # the product's share after what the profile predicts around it
        profile.quantized[form] = sorted((p.target.flops, p.target.flops / p.share(next(rest), profile))
                                         for p in form_probes)
    for op, op_probes in operators.items():
        profile.op_bandwidth[op] = sorted((p.target.bytes, p.target.bytes / p.share(next(rest), profile))
                                          for p in op_probes)
    profile.attention = sorted((p.target.flops, p.target.flops / p.share(next(rest), profile)) for p in attention)
    return profile


@dataclass
class _Probe:
    """A probe graph, its feed, and its nodes' costs: ``target`` is the node being measured."""

    model: bytes
    feed: dict[str, np.ndarray]
    costs: list[NodeCost]
    target: NodeCost

    def share(self, seconds: float, base: Profile) -> float:
        """The target node's seconds of a measured ``seconds``: what ``base`` predicts for the
        nodes around it and for the node's overhead are taken off (at least 5% is left)."""
        around = sum(c.seconds(base) for c in self.costs if c is not self.target)
        return max(seconds - around - base.overhead, 0.05 * seconds)


def _probe(model: bytes, feed: dict[str, np.ndarray], path: Path, is_target) -> _Probe:
    """A :class:`_Probe` of ``model`` (saved at ``path`` to observe its shapes)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx.load_from_string(model), str(path))
    shapes, sizes, graph = _observe(path, feed)
    costs = graph_costs(graph, shapes, sizes)
    (target,) = [c for c in costs if is_target(c)]
    return _Probe(model, feed, costs, target)


# Operators measured one by one (op, its inputs' shapes at a small encoder's and a small
# decoder's sizes, attributes, what runs before it): the operators that make up most of a
# transformer's time besides its products. A small encoder: 16 sentences of 32 tokens, width 384,
# 12 heads of 32; a small decoder: 512 tokens, width 576, 9 heads of 64 (SmolLM2's unfused
# attention scores, 9.4 MB, causally masked). The layer norm is measured after the residual Add
# and the Gelu after its bias Add, as ORT fuses them (SkipLayerNormalization, BiasGelu); the
# Add's share, at the Add's own rate (measured first), is taken off. Exported attention (MiniLM's
# and SmolLM2's alike) adds its mask to the scores, broadcast over the heads, and guards the
# probabilities against fully masked rows: ``Where(IsNaN(p), 0, p)``; the Add, IsNaN and Where
# probes read those shapes (the Add's small size is a residual's: most Adds are). Where broadcast
# a scalar and a full condition 1.8x slower per byte than a padding mask over the keys, IsNaN
# 3.5x slower than one large Add, on this 2-core machine (benchmarks/results/cost_breakdown_smollm2_attention.md).
OPERATOR_PROBES = {
    "Add": ([{"x": [16, 32, 384], "r": [16, 32, 384]}, {"x": [1, 9, 512, 512], "r": [1, 1, 512, 512]}], {}, None),
    "LayerNormalization": ([{"x": [16, 32, 384], "r": [16, 32, 384]}, {"x": [1, 512, 576], "r": [1, 512, 576]}],
                           {"axis": -1}, "Add"),
    "Gelu": ([{"x": [16, 32, 1536], "r": [1536]}, {"x": [4, 512, 1536], "r": [1536]}], {}, "Add"),
    "Softmax": ([{"x": [16, 12, 32, 32]}, {"x": [1, 9, 512, 512]}], {"axis": -1}, None),
    "Transpose": ([{"x": [16, 32, 12, 32]}, {"x": [1, 512, 9, 64]}], {"perm": [0, 2, 1, 3]}, None),
    "IsNaN": ([{"x": [16, 12, 32, 32]}, {"x": [1, 9, 512, 512]}], {}, None),
    "Where": ([{"c": [16, 12, 32, 32], "x": [16, 12, 32, 32]}, {"c": [1, 9, 512, 512], "x": [1, 9, 512, 512]}],
              {}, None),
}
BOOL_INPUTS = {"c"}  # a Where probe's condition (IsNaN's output, all false: no row is fully masked)


def _operator_probe(op: str, inputs: dict[str, list[int]], attrs: dict, before: str | None,
                    rng, causal: bool = False) -> tuple[bytes, dict[str, np.ndarray]]:
    """A model of ``op`` (after ``before``, reading x and r) with its constant inputs, and a feed.
    A Softmax's scores arrive masked, as attention's do: an encoder's padding (the last quarter
    of the keys) or, where ``causal``, a decoder's causal mask. The exponentials of masked
    scores take a slow path: 9.4 MB of scores half masked ran at 5.4 GB/s here, unmasked at 42."""
    from onnx import TensorProto, helper, numpy_helper

    x = "s" if before else "x"
    nodes = [helper.make_node(before, ["x", "r"], ["s"])] if before else []
    consts: dict[str, np.ndarray] = {}
    if op == "LayerNormalization":
        consts = {"g": np.ones(inputs["x"][-1], np.float32), "b": np.zeros(inputs["x"][-1], np.float32)}
        nodes.append(helper.make_node(op, [x, "g", "b"], ["y"], **attrs))
    elif op == "Where":
        consts = {"zero": np.array(0, np.float32)}
        nodes.append(helper.make_node(op, ["c", "zero", x], ["y"]))
    elif op == "Add":
        nodes.append(helper.make_node(op, ["x", "r"], ["y"]))
    else:
        nodes.append(helper.make_node(op, [x], ["y"], **attrs))
    kind = {n: TensorProto.BOOL if n in BOOL_INPUTS else TensorProto.FLOAT for n in inputs}
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info(n, kind[n], s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.BOOL if op == "IsNaN" else
                                                             TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for n, a in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    feed = {n: np.zeros(s, bool) if n in BOOL_INPUTS else rng.standard_normal(s).astype(np.float32)
            for n, s in inputs.items()}
    if op == "Softmax":
        keys = inputs["x"][-1]
        masked = np.triu(np.ones((keys, keys), bool), 1) if causal else np.arange(keys) >= 0.75 * keys
        feed["x"] = np.where(masked, np.finfo(np.float32).min, feed["x"]).astype(np.float32)
    return model.SerializeToString(), feed


def _operator_probes(rng, tmp: Path) -> dict[str, list[_Probe]]:
    """The probes of each of :data:`OPERATOR_PROBES`, one per size; a rate is the operator's
    bytes over its share of the probe's measured time."""
    probes: dict[str, list[_Probe]] = {}
    for op, (sizes, attrs, before) in OPERATOR_PROBES.items():
        for i, inputs in enumerate(sizes):  # an encoder's sizes, then a decoder's
            model, feed = _operator_probe(op, inputs, attrs, before, rng, causal=i == 1)
            probes.setdefault(op, []).append(_probe(model, feed, tmp / f"{op}{i}.onnx", lambda c, op=op: c.op == op))
    return probes


# GroupQueryAttention measured on causal prompts of these lengths, in a small decoder's layout
# (SmolLM2's: 9 query heads and 3 key/value heads of 64, rotary); as fused by the attention pass.
ATTENTION_PROMPTS = (128, 512, 1024)


def _attention_probes(rng, tmp: Path) -> list[_Probe]:
    """A GroupQueryAttention probe per prompt length of :data:`ATTENTION_PROMPTS`."""
    from onnx import TensorProto, helper, numpy_helper

    heads, kv_heads, dim = 9, 3, 64
    probes = []
    for length in ATTENTION_PROMPTS:
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total", "cos", "sin"],
                                ["y", "present_key", "present_value"], domain="com.microsoft", num_heads=heads,
                                kv_num_heads=kv_heads, do_rotary=1)
        widths = {"q": heads * dim, "k": kv_heads * dim, "v": kv_heads * dim}
        angles = np.outer(np.arange(length), 1e4 ** (-np.arange(dim // 2) * 2 / dim)).astype(np.float32)
        consts = {"seqlens": np.array([length - 1], np.int32), "total": np.array(length, np.int32),
                  "cos": np.cos(angles), "sin": np.sin(angles)}
        graph = helper.make_graph(
            [node], "probe", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, length, w])
                              for n, w in widths.items()],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(a, n) for n, a in consts.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        feed = {n: rng.standard_normal((1, length, w)).astype(np.float32) for n, w in widths.items()}
        probes.append(_probe(model.SerializeToString(), feed, tmp / f"attention{length}.onnx",
                             lambda c: c.kind == "attention"))
    return probes


QUANTIZED_FORMS = {"int8-dynamic": "quantize:mode=dynamic", "int4": "quantize:mode=int4"}  # as the planner runs them


def _quantized_probes(spec: str, rng, tmp: Path, sizes=GEMM_SIZES) -> list[_Probe]:
    """A probe of each GEMM size quantized by the ``quantize`` pass (``spec``). The product's rate
    is over the measured time of the whole quantized graph: the nodes around an integer product
    (DynamicQuantizeLinear, scale products, Cast) are ORT's one fused kernel, and
    :func:`fused_into_products` gives them no time of their own. (Taking off what the profile
    predicts for them instead left a small difference of noisy times: the int8 rate moved 4.2x
    to 11.1x the float rate, and to 20-40x when the measured bandwidth fell, between three
    calibrations of this 2-core machine.)"""
    import onnx
    import onnx_ir as ir

    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    probes = []
    for i, (m, k, n) in enumerate(sizes):
        weight = rng.standard_normal((k, n)).astype(np.float32)
        model = ir.serde.deserialize_model(onnx.load_from_string(
            _single_node("MatMul", {"x": [m, k], "w": [k, n]}, consts={"w": weight})))
        run_passes(model, parse_pass_specs(spec), PassContext())
        feed = {"x": rng.standard_normal((m, k)).astype(np.float32)}
        probes.append(_probe(ir.serde.serialize_model(model).SerializeToString(), feed, tmp / f"q{i}.onnx",
                             lambda c: bool(c.form) and c.kind != "fused"))
    return probes


def save_profile(profile: Profile, target_name: str) -> Path:
    path = profile_path(target_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1))
    return path
