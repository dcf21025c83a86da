"""Analysis: what a model holds before anything changes (ops, parameters, weights, layouts).

``sparsec inspect`` prints it; compile keeps it in the report. Each weight of a linear op is
listed with its reduction axis and the N:M layouts it already complies with along that axis;
a weight stored quantized (DequantizeLinear, MatMulNBits) is measured after dequantization.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from sparsec.graph import all_graphs, all_nodes, constant_ref, node_label
from sparsec.sparsity import nm_layouts, zero_fraction


@dataclass
class WeightInfo:
    name: str
    shape: list[int]
    dtype: str
    params: int
    bytes: int
    zeros: float
    op: str = ""  # consuming linear op, "" for other weights
    node: str = ""
    label: str = ""
    reduce_axis: int | None = None
    nm: list[str] = field(default_factory=list)  # N:M layouts along reduce_axis
    readers: int = 1


@dataclass
class Analysis:
    fingerprint: str
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    op_counts: dict[str, int]
    params: int
    weight_bytes: int
    weights: list[WeightInfo]
    notes: list[str] = field(default_factory=list)

    @property
    def linear_weights(self) -> list[WeightInfo]:
        return [w for w in self.weights if w.op]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _io(values) -> list[dict[str, Any]]:
    return [{"name": v.name, "dtype": str(v.dtype.name) if v.dtype else None,
             "shape": [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape else None}
            for v in values]


def analyze(model: ir.Model, fingerprint: str = "") -> Analysis:
    """Collect op counts, parameter counts and per-weight sparsity and N:M compliance."""
    from sparsec.passes.patterns import LINEAR_OPS, match_linear_weight
    from sparsec.passes.quantized import EncodedWeight

    op_counts = Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in all_nodes(model)
    )
    infos: dict[ir.Value, WeightInfo] = {}

    def info_for(value: ir.Value) -> WeightInfo | None:
        if value in infos:
            return infos[value]
        ref = constant_ref(value)
        if ref is None:
            return None
        array = ref.numpy()
        info = WeightInfo(ref.name, list(ref.shape), ref.dtype.name, int(array.size),
                          int(ref.tensor.nbytes), zero_fraction(array), readers=len(ref.users))
        infos[value] = info
        return info

    for node in all_nodes(model):
        if node.op_type in LINEAR_OPS:
            site = match_linear_weight(node)
            if site:
                info = info_for(site.weight.value)
                if info is not None and not info.op:
                    info.op, info.node, info.label = node.op_type, node.name or "", node_label(node)
                    info.reduce_axis = site.reduce_axis
                    weight = site.weight.numpy()
                    info.nm = nm_layouts(weight, site.reduce_axis)
                    if isinstance(site.weight, EncodedWeight):
                        # Stored quantized or packed: zeros and shape of what the op multiplies by.
                        info.shape, info.params = list(weight.shape), int(weight.size)
                        info.zeros = zero_fraction(weight)
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            if not value.is_graph_input():
                info_for(value)
    weights = sorted(infos.values(), key=lambda w: (not w.op, w.name))
    return Analysis(
        fingerprint=fingerprint,
        ir_version=model.ir_version,
        opsets=dict(sorted(model.opset_imports.items())),
        producer=f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        inputs=_io(v for v in model.graph.inputs if not v.is_initializer()),
        outputs=_io(model.graph.outputs),
        op_counts=dict(op_counts.most_common()),
        params=sum(w.params for w in weights),
        weight_bytes=sum(w.bytes for w in weights),
        weights=weights,
    )


def summarize_sparsity(weights: list[WeightInfo]) -> dict[str, Any]:
    """Totals over linear weights: zeros and how many comply with each N:M layout."""
    linear = [w for w in weights if w.op]
    params = sum(w.params for w in linear)
    zeros = sum(w.params * w.zeros for w in linear)
    layouts = Counter(layout for w in linear for layout in w.nm)
    return {
        "linear_weights": len(linear),
        "linear_params": params,
        "linear_zero_fraction": float(zeros / params) if params else 0.0,
        "nm_compliant": dict(sorted(layouts.items())),
        "dense_zero_fraction_all": float(np.average([w.zeros for w in weights], weights=[w.params for w in weights]))
        if weights else 0.0,
    }
