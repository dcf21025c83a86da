"""Quantization by ONNX Runtime's own tooling, after the sparsity passes, zeros kept exact.

Before: MatMul / Gemm / Conv with float32 constant weights (pruned or not).
After, by ``mode`` (each one call into ``onnxruntime.quantization``; nothing is quantized here):

* ``dynamic`` -- ``quantize_dynamic``: int8 weight codes with a scale and zero point, read by
  MatMulInteger (ConvInteger); activations quantized at run time by DynamicQuantizeLinear, the
  int32 product cast and scaled back (ORT fuses the group into DynamicQuantizeMatMul when the
  session starts). ``quantize_dynamic`` writes only this operator form (QOperator).
* ``static`` -- ``quantize_static`` in QDQ form: weights ``DequantizeLinear(int8 codes)``,
  activations QuantizeLinear -> DequantizeLinear with ranges calibrated (MinMax) on the compile's
  calibration data; the CPU EP runs each group as QLinearMatMul / QLinearConv.
* ``int4`` -- ``MatMulNBitsQuantizer`` (round to nearest): MatMul -> com.microsoft.MatMulNBits,
  4-bit codes in blocks of ``block_size`` along K, asymmetric (zero points) or symmetric.

Only the linear ops whose weights the pass selected are handed to ORT (``nodes_to_quantize``):
MatMuls of two activations (attention scores) stay float in every mode, and so do Mixture-of-
Experts routers (ROUTER; ``routers=true`` quantizes them): their rounded logits choose other
experts. ``com.microsoft.MoE`` nodes, which ORT's quantizers leave alone, become
``com.microsoft.QMoE`` nodes with int8 (dynamic) or int4 experts (:mod:`.qmoe`).

The bridge: the model is saved into a temporary directory (weights as external data), ORT's
quantizer writes its result there, and the result is read back into memory. Then every weight
ORT quantized is decoded from its stored form and checked against the weight it came from:
each entry that was 0 must dequantize to exactly 0 (ORT's quantizers make 0 a code: the zero
point), and every N:M layout the weight had along its reduction axis must still hold. Any
failure is a PassError and the model is left as it was; only a checked result replaces it.

Runs last: the plan moves it after every other pass (pruning reads float weights; a pass after
it would find integer codes). Lossy: compile measures fidelity like any lossy pass.

Skipped: weights that are not float32 (DTYPE_UNSUPPORTED), already quantized or cast
(QUANTIZED), computed (NOT_CONSTANT), compressed by ``compress`` (COMPRESSED), inside
If/Loop/Scan bodies (IN_SUBGRAPH); ops the mode has no quantized form for, such as Gemm in
dynamic mode or a MatMul whose weight is its first operand (MODE_UNSUPPORTED); weights in
Constant nodes and any node ORT declines (LEFT_FLOAT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sparsec.errors import OptionError, PassError
from sparsec.graph import all_nodes, constant_ref, mark_changed
from sparsec.pipeline import Kind, Pass, PassContext, PassOptions, PassRecord, SiteRecord, option, register
from sparsec.sparsity import nm_layouts, zero_fraction
from sparsec.targets import INT4, INT8_DYNAMIC, INT8_QDQ

from . import patterns
from . import qmoe
from .patterns import MS_DOMAIN, STANDARD_DOMAINS, Code, LinearWeight, MatchFailure
from .quantized import EncodedWeight

MODES = ("dynamic", "static", "int4")
QUANTIZABLE = ("MatMul", "Gemm", "Conv")
# The ops each ORT quantizer has a quantized form for (IntegerOps, QDQ, MatMulNBits registries).
MODE_OPS = {"dynamic": ("MatMul", "Conv"), "static": QUANTIZABLE, "int4": ("MatMul",)}
MODE_FORMS = {"dynamic": INT8_DYNAMIC, "static": INT8_QDQ, "int4": INT4}
# What ORT adds to a weight's name for its codes, scale and zero point (all forms).
STORED_SUFFIXES = ("_quantized", "_scale", "_zero_point", "_Q4", "_scales", "_zero_points")
INT8_ONLY = ("per_channel", "weight_type")
STATIC_ONLY = ("activation_type",)
INT4_ONLY = ("block_size", "symmetric", "accuracy_level")


@dataclass(frozen=True)
class QuantizeOptions(PassOptions):
    mode: str = option("dynamic", "dynamic: int8 weights, activations quantized at run time (MatMulInteger);"
                       " static: int8 QDQ with activation ranges from --calib; int4: MatMulNBits",
                       choices=MODES, calibrated=("static",))
    per_channel: bool = option(True, "dynamic/static: one scale per output channel (false: one per tensor, ORT's"
                               " default; as fast here, and further from the float model)")
    weight_type: str = option("int8", "dynamic/static: weight codes (int8: ORT's default and the faster"
                              " one here)", choices=("int8", "uint8"))
    activation_type: str = option("uint8", "static: activation codes (uint8 with int8 weights is ORT's"
                                  " x86 recommendation)", choices=("uint8", "int8"))
    block_size: int = option(128, "int4: weights per scale along K (a power of two)", min=16, max=256)
    symmetric: bool = option(False, "int4: symmetric codes without zero points (ORT's default: asymmetric)")
    accuracy_level: int = option(4, "int4: MatMulNBits compute type (0 unset, 1 fp32, 2 fp16, 3 bf16,"
                                 " 4 int8 activations: the faster one here)", min=0, max=4)
    op_types: tuple[str, ...] = option(QUANTIZABLE, "op types whose weights are quantized (the mode's"
                                       " forms permitting)", choices=QUANTIZABLE)
    routers: bool = option(False, "also quantize Mixture-of-Experts routers (MatMul / Gemm whose logits reach a"
                           " TopK): tiny weights, and rounding them changes which experts run")
    include: tuple[str, ...] = option((), "glob patterns over module path, node name, weight name, op type"
                                      " or weight shape; when given, only matching sites are quantized")
    exclude: tuple[str, ...] = option((), "glob patterns of sites left in float")

    def validate(self) -> None:
        if self.block_size & (self.block_size - 1):
            raise OptionError(f"quantize: option 'block_size' must be a power of two; got {self.block_size}")
        applies = {"dynamic": INT8_ONLY, "static": INT8_ONLY + STATIC_ONLY, "int4": INT4_ONLY}[self.mode]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in INT8_ONLY + STATIC_ONLY + INT4_ONLY:
            if name not in applies and getattr(self, name) != defaults[name]:
                modes = [m for m, names in (("dynamic", INT8_ONLY), ("static", INT8_ONLY + STATIC_ONLY),
                                            ("int4", INT4_ONLY)) if name in names]
                raise OptionError(f"quantize: option '{name}' applies to mode={'|'.join(modes)} only;"
                                  f" got mode={self.mode}")


@dataclass(frozen=True)
class Stored:
    """A weight as ORT stored it, decoded: ``values`` has the float weight's shape; where the
    scale is applied after the product (MatMulInteger), it holds code - zero point."""

    name: str
    values: np.ndarray
    form: str  # "int8" | "qdq" | "nbits"
    node: ir.Node  # the op that reads it


@register
class QuantizePass(Pass):
    """Quantize linear weights with ONNX Runtime's quantizers; pruned zeros stay exactly 0."""

    id = "quantize"
    summary = ("ONNX Runtime quantization (int8 dynamic, int8 static QDQ, int4 MatMulNBits; MoE experts in QMoE),"
               " zeros kept exact")
    kinds = (Kind.LOSSY,)
    matches = ("MatMul / Gemm / Conv with a float32 initializer weight, as the mode's ORT quantizer takes it;"
               " com.microsoft.MoE nodes (their experts into com.microsoft.QMoE)")
    Options = QuantizeOptions
    order = 1  # after the sparsity passes, before compress

    def sparse_form(self) -> str:
        return MODE_FORMS[self.options.mode]

    def match(self, model: ir.Model, ctx: PassContext, record: PassRecord) -> list[LinearWeight | qmoe.MoeSite]:
        opts: QuantizeOptions = self.options  # type: ignore[assignment]
        sites: list[LinearWeight | qmoe.MoeSite] = []
        for node in all_nodes(model):
            if node.domain == MS_DOMAIN and node.op_type == "MoE":
                moe = qmoe.match_moe(node, model, opts.mode, ctx.target)
                failure = moe if isinstance(moe, MatchFailure) else patterns.select(moe, opts.include, opts.exclude)
                if failure is not None:
                    record.skip(failure, node=node)
                    continue
                sites.append(moe)
                continue
            if node.domain not in STANDARD_DOMAINS or node.op_type not in opts.op_types:
                continue
            site = patterns.match_linear_weight(node, decode=False)
            if not site:
                record.skip(site, node=node)
                continue
            failure = next((f for f in (check() for check in (
                lambda: _compressed(site),
                lambda: patterns.select(site, opts.include, opts.exclude),
                lambda: None if opts.routers else qmoe.router_failure(site.node),
                lambda: _supported(site, opts.mode),
                lambda: _in_subgraph(site, model),
                lambda: _initializer(site),
            )) if f is not None), None)
            if failure is not None:
                record.skip(failure, site=site.label, node=node, weight=site.weight.name, shape=site.weight.shape)
                continue
            sites.append(site)
        return sites

    def run(self, model: ir.Model, ctx: PassContext) -> PassRecord:
        opts: QuantizeOptions = self.options  # type: ignore[assignment]
        record = self.new_record()
        sites = self.match(model, ctx, record)
        if not sites:
            record.notes.append("no weight to quantize")
            return record
        if opts.mode == "static" and ctx.calibration is None:
            raise OptionError("quantize: mode=static calibrates activation ranges; give --calib (a .npz, a text"
                              " file with --tokenizer, or 'builtin' for the example models)")
        for i, site in enumerate(sites):
            site.node.name = site.node.name or f"quantize.site.{i}"  # ORT selects nodes by name
        moes = [s for s in sites if isinstance(s, qmoe.MoeSite)]
        sites = [s for s in sites if not isinstance(s, qmoe.MoeSite)]
        # The experts are quantized and checked first: a failure leaves the model as it was.
        with ctx.progress.task(f"quantize: {len(moes)} MoE nodes -> com.microsoft.QMoE"):
            plans = [qmoe.plan_site(s, opts.mode, weight_type=opts.weight_type, block_size=opts.block_size,
                                    symmetric=opts.symmetric, accuracy_level=opts.accuracy_level) for s in moes]
        inputs = [v.name for v in model.graph.inputs]
        if sites:
            with ctx.progress.task(f"quantize: ONNX Runtime {opts.mode} quantization of {len(sites)} weights"):
                new, tool = _quantize(model, [s.node.name or "" for s in sites], opts, ctx)
            if [v.name for v in new.graph.inputs] != inputs or \
                    [v.name for v in new.graph.outputs] != [v.name for v in model.graph.outputs]:
                raise PassError("quantize: ONNX Runtime's quantizer changed the model's inputs or outputs")
            changed = _check(sites, new, opts.mode, record)
            _tag(model, new, self.id, f"quantized by ONNX Runtime ({tool})")
        else:
            new, tool, changed = model, "", []
        ops_before = Counter(n.op_type for n in all_nodes(model))
        changed += _apply_qmoe(new, plans, self.id)
        if plans:
            tool = "; ".join(t for t in (tool, f"{len(plans)} MoE nodes -> QMoE ({_qmoe_tool(plans)})") if t)
        ops = _op_changes(ops_before, new)
        before = sum(s.details["bytes_before"] for s in changed)
        after = sum(s.details["bytes_after"] for s in changed)
        # Only now, every check passed: the model takes the quantized graph.
        if new is not model:
            model.graph = new.graph
            model.ir_version = max(model.ir_version, new.ir_version)
            for key, function in new.functions.items():
                model.functions[key] = function
        if plans:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        record.sites.extend(changed)
        record.extra["quantization"] = {"tool": tool, "ops": ops, "weight_bytes_before": before,
                                        "weight_bytes_after": after}
        record.notes.append(f"{len(changed)} weights quantized ({tool}): {before} -> {after} bytes"
                            f" ({after / before:.1%}); pruned zeros dequantize to exactly 0 and N:M layouts hold"
                            " (checked on every weight)")
        if ctx.calibration is not None and opts.mode == "static":
            record.notes.append(f"activation ranges: {ctx.calibration.source}")
        return record


# --- matching ----------------------------------------------------------------------------------

def _compressed(site: LinearWeight) -> MatchFailure | None:
    if site.weight.packed is not None:
        return MatchFailure(Code.COMPRESSED, f"'{site.weight.name}' is stored compressed; quantize before"
                            " compress (the plan orders quantize last, so leave compress out)", site.node)
    return None


def _supported(site: LinearWeight, mode: str) -> MatchFailure | None:
    ops = MODE_OPS[mode]
    if site.op not in ops:
        return MatchFailure(Code.MODE_UNSUPPORTED, f"mode={mode} quantizes {', '.join(ops)}, not {site.op}", site.node)
    if site.op != "Conv" and site.input_index != 1:
        return MatchFailure(Code.MODE_UNSUPPORTED, f"the weight '{site.weight.name}' is the {site.op}'s first"
                            " operand; ONNX Runtime quantizes the second", site.node)
    if mode == "int4" and len(site.weight.shape) != 2:
        return MatchFailure(Code.MODE_UNSUPPORTED, f"weight of rank {len(site.weight.shape)}; MatMulNBits takes a"
                            " 2-D weight", site.node)
    if site.weight.dtype != ir.DataType.FLOAT:
        return MatchFailure(Code.DTYPE_UNSUPPORTED, f"'{site.weight.name}' is {site.weight.dtype};"
                            " ONNX Runtime's quantizers take float32 weights", site.node)
    return None


def _in_subgraph(site: LinearWeight, model: ir.Model) -> MatchFailure | None:
    if site.node.graph is not model.graph:
        return MatchFailure(Code.IN_SUBGRAPH, "ONNX Runtime's quantizers leave If/Loop/Scan bodies alone", site.node)
    return None


def _initializer(site: LinearWeight) -> MatchFailure | None:
    if site.weight.constant_node is not None:
        return MatchFailure(Code.LEFT_FLOAT, f"'{site.weight.name}' is a Constant node; ONNX Runtime's"
                            " quantizers read initializers only", site.node)
    return None


# --- the bridge to ONNX Runtime ------------------------------------------------------------------

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizers log progress and advice at INFO / WARNING (and one module configures the
    root logger when imported): keep the user's console and logging setup as they were."""
    root = logging.getLogger()
    handlers, level, disabled = list(root.handlers), root.level, logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(disabled)
        root.handlers[:] = handlers
        root.setLevel(level)


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over the compile's calibration sets."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], names: list[str]) -> None:
        self._sets = iter([{n: f[n] for n in names if n in f} for f in feeds])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._sets, None)

    def rewind(self) -> None:  # ORT calls it on some paths; the sets are read once
        pass


def _quantize(model: ir.Model, nodes: list[str], opts: QuantizeOptions, ctx: PassContext) -> tuple[ir.Model, str]:
    """Run the mode's ORT quantizer on a copy of ``model`` in a temporary directory; the result
    read back fully into memory, and a description of the call."""
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="sparsec-quantize-") as tmp:
        src, out = Path(tmp) / "model.onnx", Path(tmp) / "quantized.onnx"
        ir.save(model, src, external_data="model.onnx.data")
        with _quiet():
            tool = _call_ort(src, out, nodes, [v.name or "" for v in model.graph.inputs], opts, ctx)
        try:
            new = ir.load(out)
            ir.external_data.load_to_model(new)
        except Exception as exc:  # a quantizer that wrote nothing or a broken file
            raise PassError(f"quantize: ONNX Runtime's quantizer left no readable model ({exc})") from None
    return new, f"onnxruntime {onnxruntime.__version__} {tool}"


def _call_ort(src: Path, out: Path, nodes: list[str], inputs: list[str], opts: QuantizeOptions,
              ctx: PassContext) -> str:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if opts.mode == "dynamic":
        quantize_dynamic(src, out, op_types_to_quantize=list(MODE_OPS["dynamic"]), nodes_to_quantize=nodes,
                         per_channel=opts.per_channel, weight_type=types[opts.weight_type],
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        return f"quantize_dynamic, {opts.weight_type} weights {'per channel' if opts.per_channel else 'per tensor'}"
    if opts.mode == "static":
        reader = _Reader(ctx.calibration.feeds, inputs)
        quantize_static(src, out, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZABLE),
                        nodes_to_quantize=nodes, per_channel=opts.per_channel,
                        activation_type=types[opts.activation_type], weight_type=types[opts.weight_type],
                        use_external_data_format=True)
        return (f"quantize_static QDQ, {opts.weight_type} weights {'per channel' if opts.per_channel else 'per tensor'},"
                f" {opts.activation_type} activations, {len(ctx.calibration.feeds)} calibration sets")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(str(src), bits=4, block_size=opts.block_size, is_symmetric=opts.symmetric,
                                     accuracy_level=opts.accuracy_level, nodes_to_include=nodes,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)
    return (f"MatMulNBitsQuantizer, 4 bits, block {opts.block_size}, {'symmetric' if opts.symmetric else 'asymmetric'},"
            f" accuracy_level {opts.accuracy_level}")


# --- checking what ORT wrote ---------------------------------------------------------------------

def _integer_weight(node: ir.Node) -> Stored | None:
    """The weight of a MatMulInteger (B, input 1; zero point per tensor or per column, input 3) or
    ConvInteger (w, input 1; zero point per tensor or per output channel, input 3) as code minus
    zero point (the scale multiplies the int32 product afterwards)."""
    codes = constant_ref(node.inputs[1]) if len(node.inputs) > 1 else None
    if codes is None:
        return None
    zero = constant_ref(node.inputs[3]) if len(node.inputs) > 3 else None
    q = codes.numpy().astype(np.int32)
    zp = zero.numpy().astype(np.int32) if zero is not None else np.zeros((), np.int32)
    if zp.size > 1:
        zp = zp.reshape(-1) if node.op_type == "MatMulInteger" else zp.reshape(-1, *([1] * (q.ndim - 1)))
    return Stored(codes.name, q - zp, "int8", node)


def _stored_weights(model: ir.Model) -> dict[str, Stored]:
    """Every quantized constant weight a linear op of ``model`` reads, decoded, by stored name."""
    out: dict[str, Stored] = {}
    for node in all_nodes(model):
        if node.domain in STANDARD_DOMAINS and node.op_type in ("MatMulInteger", "ConvInteger"):
            found = _integer_weight(node)
            if found is not None:
                out.setdefault(found.name, found)
        elif node.op_type in patterns.LINEAR_OPS:
            site = patterns.match_linear_weight(node)
            if site and isinstance(site.weight, EncodedWeight) and site.weight.form in ("qdq", "nbits"):
                out.setdefault(site.weight.name, Stored(site.weight.name, site.weight.numpy(), site.weight.form, node))
    return out


def _attribute(stored: dict[str, Stored], sites: list[LinearWeight]) -> dict[str, Stored]:
    """Original weight name -> its stored form. ORT names a quantized weight after the float one
    (``W_quantized``, ``W_Q4``): the longest original name that starts the stored name, with the
    same shape, is its origin."""
    shapes = {s.weight.name: tuple(s.weight.shape) for s in sites}
    out: dict[str, Stored] = {}
    for name, found in stored.items():
        origins = [w for w, shape in shapes.items() if name.startswith(w) and tuple(found.values.shape) == shape]
        if origins:
            out.setdefault(max(origins, key=len), found)
    return out


def _check(sites: list[LinearWeight], new: ir.Model, mode: str, record: PassRecord) -> list[SiteRecord]:
    """The changed sites, each checked: zeros exact, N:M layouts kept. Sites ORT left in float go
    into ``record``; a weight that vanished without a form sparsec can check is a PassError."""
    found = _attribute(_stored_weights(new), sites)
    floats = {v.name for v in new.graph.initializers.values() if v.const_value is not None
              and v.const_value.dtype == ir.DataType.FLOAT}
    new_inits = {name: v for name, v in new.graph.initializers.items() if v.const_value is not None}
    changed, done = [], set()
    for site in sites:
        name = site.weight.name
        if name in done:  # a weight shared by several quantized nodes is checked once
            continue
        done.add(name)
        stored = found.get(name)
        if stored is None:
            if name in floats:
                record.skip(MatchFailure(Code.LEFT_FLOAT, f"ONNX Runtime's {mode} quantizer left '{name}' in float",
                                         site.node), site=site.label, weight=name, shape=site.weight.shape)
                continue
            raise PassError(f"quantize: ONNX Runtime replaced weight '{name}' by a form sparsec cannot decode,"
                            " so its zeros cannot be checked; nothing was changed")
        original = site.weight.numpy()
        lost = int(np.count_nonzero((original == 0) & (stored.values != 0)))
        if lost:
            raise PassError(f"quantize: {lost} entries of '{name}' that were 0 do not dequantize to 0 after"
                            f" {mode} quantization ({stored.form} codes): ONNX Runtime's quantizer did not keep"
                            " zeros exact; nothing was changed")
        layouts = nm_layouts(original, site.reduce_axis)
        kept = nm_layouts(stored.values, site.reduce_axis)
        broken = [layout for layout in layouts if layout not in kept]
        if broken:
            raise PassError(f"quantize: '{name}' was {broken[0]} along its reduction axis and is not after"
                            f" {mode} quantization; nothing was changed")
        after = sum(new_inits[name + suffix].const_value.nbytes for suffix in STORED_SUFFIXES
                    if name + suffix in new_inits)
        reason = f"{stored.form} codes: {original.nbytes} -> {after} bytes"
        changed.append(SiteRecord(
            site=site.label, node=stored.node.name or "", action="changed", message=reason, weight=name,
            shape=tuple(site.weight.shape), params=int(original.size), sparsity_before=zero_fraction(original),
            sparsity_after=zero_fraction(stored.values),
            details={"stored": stored.form, "bytes_before": int(original.nbytes), "bytes_after": int(after),
                     "nm": layouts}))
    return changed


def _tag(old: ir.Model, new: ir.Model, pass_id: str, reason: str) -> None:
    """Provenance on every node ORT added or rewired."""
    before = {n.name: (n.op_type, tuple(v.name if v is not None else "" for v in n.inputs)) for n in all_nodes(old)}
    for node in all_nodes(new):
        if before.get(node.name) != (node.op_type, tuple(v.name if v is not None else "" for v in node.inputs)):
            mark_changed(node, pass_id, reason)


def _op_changes(a: Counter, new: ir.Model) -> dict[str, dict[str, int]]:
    """Node counts per op type that the quantization changed: {op: {"before": n, "after": m}}."""
    b = Counter(n.op_type for n in all_nodes(new))
    return {op: {"before": a[op], "after": b[op]} for op in sorted(set(a) | set(b)) if a[op] != b[op]}


# --- MoE nodes -> QMoE -----------------------------------------------------------------------------

def _apply_qmoe(model: ir.Model, plans: list[qmoe.QmoePlan], pass_id: str) -> list[SiteRecord]:
    """Each planned MoE node of ``model`` (found by name: ORT's quantizers keep the names of the
    nodes they leave alone) replaced by its QMoE node; a record per expert weight."""
    nodes = {n.name: n for n in model.graph if n.op_type == "MoE" and n.domain == MS_DOMAIN}
    out = []
    for plan in plans:
        node = nodes.get(plan.site.node.name or "")
        if node is None:
            raise PassError(f"quantize: the MoE node '{plan.site.node.name}' is missing after ONNX Runtime's"
                            " quantizer; nothing was changed")
        new = qmoe.apply_plan(model.graph, plan, node, pass_id)
        bits, block = plan.attributes["expert_weight_bits"], plan.attributes.get("block_size", 0)
        for check in plan.checks:
            out.append(SiteRecord(
                site=plan.site.label, node=new.name or "", action="changed",
                message=f"QMoE {bits}-bit codes: {check['bytes_before']} -> {check['bytes_after']} bytes",
                weight=check["name"], shape=check["shape"], params=check["params"],
                sparsity_before=check["sparsity_before"], sparsity_after=check["sparsity_after"],
                details={"stored": f"qmoe-int{bits}", "bytes_before": check["bytes_before"],
                         "bytes_after": check["bytes_after"], "nm": check["nm"], "block_size": block,
                         "padding_neurons": plan.padding,
                         "accuracy_level": plan.attributes.get("accuracy_level", 0)}))
    return out


def _qmoe_tool(plans: list[qmoe.QmoePlan]) -> str:
    bits = plans[0].attributes["expert_weight_bits"]
    if bits == 8:
        return "8-bit per row, onnxruntime.quantization.quant_utils.quantize_data"
    blocks = sorted({p.attributes["block_size"] for p in plans})
    return (f"4-bit in blocks of {'/'.join(map(str, blocks))}, quantize_matmul_4bits,"
            f" accuracy_level {plans[0].attributes['accuracy_level']}")
