"""FFN -> Mixture-of-Experts (MoEfication with shared experts), as a graph rewrite.

Before: a dense FFN ``y = down(act(x Wg) * (x Wu))`` (or ``down(act(x Wu))``) with I neurons.
After:  the neurons split into ``shared`` ones, kept in the original FFN subgraph (sliced like
structured pruning slices it, so they are computed exactly as the exporter wrote them), and E
routed experts. A router (a small linear map on x) scores the experts per token; ``TopK``
keeps k of them inside the graph, so no tie is left to a kernel (CPU and CUDA break ties
differently). ``y = shared_ffn(x) + sum over the k chosen experts of down_e(act(x W_e))``.

Lowerings (:mod:`.moe_lowering`): ``gather`` -- standard ops that compute only the chosen
experts (tokens sorted and split by expert), the activation emitted exactly; ``contrib`` --
ONNX Runtime's ``com.microsoft.MoE`` kernel (relu, silu, swiglu, and gelu in its tanh form);
``masked`` -- the dense FFN with the routed mask on its hidden units (any activation, no speed).
``auto`` takes ``contrib`` for decoders with a KV cache (the kernel is fastest on one token),
``gather`` otherwise, and ``masked`` for activations neither can express.

With k = E every expert is active and the rewrite is exact. Experts come from balanced
clustering of the routed neurons by their activations on calibration data (or their
first-layer weights); neurons are only permuted, no weight value changes. Routers: ``linear``
(MoEfication: least squares from x to each expert's output norm on calibration data) or
``centroid`` (parameter-free). Each site's record holds the router's top-k recall against the
oracle (the k experts with the largest outputs) and the experts' load.

Skipped: FFN-shaped sites that are not a region (``NOT_A_REGION``), whose values escape
(``ESCAPES``), whose gate and up roles cannot be told apart (``UNKNOWN_LAYOUT``), with fewer
neurons than experts (``TOO_SMALL``), opset below 13 (``OPSET_TOO_OLD``), inside subgraphs
(``IN_SUBGRAPH``), or that the lowering asked for cannot express (``ACTIVATION_UNSUPPORTED``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sparsec.errors import OptionError
from sparsec.pipeline import REORDER_TOLERANCE, Kind, Pass, PassContext, PassOptions, PassRecord, SiteRecord, option, register
from sparsec.targets import MASKED, MOE

from sparsec.feeds import is_kv_cache_name
from sparsec.graph import PROVENANCE_PASS

from . import moe_experts as mx
from . import moe_lowering as lw
from .blocks import GELU, SILU, FfnBlock, match_ffn_block
from .patterns import Code, MatchFailure, select
from .structured_patterns import Region, ffn_region

MIN_OPSET = 13  # TopK / ScatterElements / Split / Pad with tensor inputs
DENSE_CAPTURES = "moe.dense_captures"  # PassContext.extras key, see dense_captures
MAX_TOKENS = 16384  # calibration tokens kept per FFN for the statistics
REFIT_TOKENS_PER_NEURON = 4  # fewer, and the least-squares refit fits the calibration tokens, not the FFN


@dataclass(frozen=True)
class MoEOptions(PassOptions):
    experts: int = option(8, "routed experts per FFN (E)", min=2, max=256, search=(4, 8, 16))
    k: int = option(2, "experts active per token (k = experts: every expert, exact)", min=1, max=256,
                    search=(1, 2, 4))
    shared: float = option(-1.0, "fraction of neurons kept always on (shared experts); -1 chooses them"
                           " from calibration (neurons active for most tokens)", min=-1.0, max=0.9,
                           search=(0.0, 0.125, 0.25), calibrated=(-1.0,))
    split: str = option("coactivation", "how neurons are grouped into experts: coactivation (activations"
                        " on calibration data) or weights (first-layer rows)", choices=("coactivation", "weights"),
                        calibrated=("coactivation",))
    router: str = option("linear", "linear: fitted on calibration data to predict each expert's output"
                         " norm (MoEfication); centroid: each expert's mean first-layer row (no data)",
                         choices=("linear", "centroid"), calibrated=("linear",))
    refit: bool = option(True, "refit the down projections by least squares on the routed hidden units"
                         " (calibration data), so the kept experts stand in for the dropped ones; k < experts",
                         calibrated=(True,))
    damp: float = option(0.01, "refit: dampening, as a fraction of the mean Gram diagonal", min=0.0, max=1.0)
    lowering: str = option("auto", "gather: standard ops computing only the chosen experts; contrib:"
                           " com.microsoft.MoE; masked: standard ops, every expert computed (no speed);"
                           " auto: contrib for KV-cache decoders, else gather",
                           choices=("auto", "gather", "contrib", "masked"))
    include: tuple[str, ...] = option((), "glob patterns over the FFN's module path or exit node name")
    exclude: tuple[str, ...] = option((), "glob patterns of FFNs left dense")

    def validate(self) -> None:
        if self.k > self.experts:
            raise OptionError(f"moe: k must be at most experts (got k={self.k}, experts={self.experts})")
        if self.shared != -1.0 and not 0.0 <= self.shared < 1.0:
            raise OptionError(f"moe: shared is a fraction in [0, 1) or -1 (from calibration), got {self.shared}")


@dataclass
class MoeSite:
    """An FFN the pass will rewrite."""

    block: FfnBlock
    region: Region
    lowering: str  # gather | contrib | masked
    notes: list[str] = field(default_factory=list)

    @property
    def node(self) -> ir.Node:
        return self.block.node

    @property
    def label(self) -> str:
        return self.block.label


@register
class FfnToMoePass(Pass):
    """Split each FFN into shared neurons and routed experts; route k of E per token."""

    id = "moe"
    summary = "FFN -> Mixture-of-Experts: shared neurons + k of E routed experts per token"
    kinds = (Kind.LOSSY, Kind.EXACT)
    matches = "an FFN (GELU/ReLU/SiLU, SwiGLU ...) whose hidden values are read nowhere else"
    Options = MoEOptions
    # The experts' outputs are summed in another order (k = E is exact up to it: SmolLM2-135M's
    # logits move by up to 2.2e-3 on random inputs, 9e-4 on real text).
    reorder_tolerance = REORDER_TOLERANCE

    @property
    def kind(self) -> Kind:
        return Kind.EXACT if self.options.k == self.options.experts else Kind.LOSSY

    def sparse_form(self) -> str:
        return MASKED if self.options.lowering == "masked" else MOE

    def needs_calibration(self) -> bool:
        """With every expert active the routing decides nothing: no data needed."""
        return self.options.k < self.options.experts and super().needs_calibration()

    def match(self, model: ir.Model, ctx: PassContext, record: PassRecord) -> list[MoeSite]:
        opts: MoEOptions = self.options  # type: ignore[assignment]
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        decoder = any(is_kv_cache_name(v.name or "") for v in model.graph.inputs if not v.is_initializer())
        sites = []
        for node in list(model.graph):
            if node.op_type != "MatMul":
                continue
            found = self._site(node, model, opts, opset, decoder)
            if isinstance(found, MatchFailure):
                record.skip(found, node=node)
            else:
                sites.append(found)
        return sites

    def _site(self, node: ir.Node, model: ir.Model, opts: MoEOptions, opset: int,
              decoder: bool) -> MoeSite | MatchFailure:
        if node.metadata_props.get(PROVENANCE_PASS) == self.id:
            return MatchFailure(Code.ALREADY_SPARSE, "already routed by moe (its shared neurons stay dense)", node)
        block = match_ffn_block(node)
        if not block:
            return block
        region = ffn_region(block)
        if not region:
            return region
        failure = select(block, opts.include, opts.exclude)
        if failure is not None:
            return failure
        if block.up is None:
            return MatchFailure(Code.UNKNOWN_LAYOUT, "cannot tell the gate projection from the up projection",
                                node)
        if block.hidden < opts.experts:
            return MatchFailure(Code.TOO_SMALL, f"{block.hidden} neurons < {opts.experts} experts", node)
        if opset < MIN_OPSET:
            return MatchFailure(Code.OPSET_TOO_OLD, f"opset {opset} < {MIN_OPSET} (TopK, ScatterElements)", node)
        if node.graph is not model.graph:
            return MatchFailure(Code.IN_SUBGRAPH, "calibration cannot capture inside an If/Loop/Scan body", node)
        return self._lowering(block, region, opts, decoder)

    def _lowering(self, block: FfnBlock, region: Region, opts: MoEOptions, decoder: bool) -> MoeSite | MatchFailure:
        """The lowering this FFN gets, or why the one asked for cannot express it."""
        biases = {b.value for b in (block.up_bias, block.gate_bias) if b is not None}
        extra = any(s.ref.value not in biases for s in region.others)
        problems = {
            "masked": "",
            "gather": "a per-neuron constant other than the biases sits inside the FFN" if extra else (
                f"no standard-op form of the {block.kind} activation" if block.activation not in lw.EMITTED_ACTIVATIONS
                else ""),
            "contrib": "a per-neuron constant other than the biases sits inside the FFN" if extra else (
                f"the MoE kernel has no {block.kind} activation" if block.activation not in lw.KERNEL_ACTIVATIONS
                or (block.glu and block.activation != SILU) else (
                    "the MoE kernel's gelu is the tanh approximation, and k = experts must be exact"
                    if block.activation == GELU and self.kind is Kind.EXACT else "")),
        }
        if opts.lowering != "auto":
            if problems[opts.lowering]:
                code = Code.UNKNOWN_LAYOUT if "constant" in problems[opts.lowering] else Code.ACTIVATION_UNSUPPORTED
                return MatchFailure(code, problems[opts.lowering], block.node)
            return MoeSite(block, region, opts.lowering, self._notes(block, opts.lowering))
        preferred = ("contrib", "gather") if decoder else ("gather", "contrib")
        chosen = next((name for name in preferred if not problems[name]), "masked")
        notes = self._notes(block, chosen)
        if chosen == "masked":
            notes.append(f"masked lowering (no speed): {problems['gather']}")
        return MoeSite(block, region, chosen, notes)

    @staticmethod
    def _notes(block: FfnBlock, lowering: str) -> list[str]:
        if lowering == "contrib" and block.activation == GELU:
            return ["the kernel computes gelu with the tanh approximation (the model uses erf)"]
        return []

    def run(self, model: ir.Model, ctx: PassContext) -> PassRecord:
        opts: MoEOptions = self.options  # type: ignore[assignment]
        record = self.new_record()
        sites = self.match(model, ctx, record)
        if not sites:
            return record
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if self.needs_calibration() and ctx.calibration is None:
            raise OptionError("moe: router=linear, split=coactivation and shared=-1 need calibration data;"
                              " give --calib, or use router=centroid,split=weights,shared=0")
        feeds = ctx.calibration.feeds if ctx.calibration is not None else []
        known = ctx.extras.get(DENSE_CAPTURES, {})  # the planner's one capture of the unpruned model
        if any(site.block.input.name not in known for site in sites):
            known = {}  # all from it, or all captured here
        runner = ctx.runner.staged(model, feeds, progress=ctx.progress) if feeds and not known else None
        for site in ctx.progress.track(sites, f"{self.id}: {len(sites)} FFNs", total=len(sites)):
            if site.block.input.name in known:
                x, h = (np.load(path, mmap_mode="r") for path in known[site.block.input.name])
            else:
                x, h = self._capture(runner, site, feeds) if runner is not None else (None, None)
            plan = self._experts(site, x, h, opts, ctx.seed)
            lower = {"gather": lw.lower_gather, "contrib": lw.lower_contrib, "masked": lw.lower_masked}[site.lowering]
            anchor = lower(model, site, plan, opts, self.id, opset)
            if runner is not None and site.lowering != "masked" and len(plan.shared):
                # What is already computed of the hidden units shrinks to the shared neurons.
                runner.transform(site.block.down.node.inputs[0], lambda a, s=plan.shared: a[..., s])
            if runner is not None:
                runner.unpin(site.block.input)
            record.sites.append(_site_record(site, plan, opts, self.id, anchor))
        if ctx.calibration is not None:
            record.notes.append(f"calibration: {ctx.calibration.source}")
        return record

    @staticmethod
    def _capture(runner, site: MoeSite, feeds) -> tuple[np.ndarray, np.ndarray]:
        """The FFN's input and hidden units on the calibration data, as (tokens, H) and (tokens, I).
        The input stays in the runner's frontier: the router will read it (unpinned after)."""
        runner.pin(site.block.input)
        xs = [_rows(x, feed) for x, feed in zip(runner.capture(site.block.input), feeds)]
        hs = [_rows(h, feed) for h, feed in zip(runner.capture(site.block.down.node.inputs[0]), feeds)]
        x, h = np.concatenate(xs), np.concatenate(hs)
        if len(x) > MAX_TOKENS:
            pick = np.linspace(0, len(x) - 1, MAX_TOKENS).astype(np.int64)
            x, h = x[pick], h[pick]
        return x.astype(np.float32), h.astype(np.float32)

    def _experts(self, site: MoeSite, x, h, opts: MoEOptions, seed: int) -> ExpertPlan:
        block = site.block
        neurons = block.hidden
        down = block.down.weight.numpy().astype(np.float32)  # (I, out)
        first = _first_rows(block)  # (I, H) or (I, 2H) for gated FFNs
        density = opts.k / opts.experts
        rates = mx.activation_rates(h, density) if h is not None else np.zeros(neurons)
        if opts.shared >= 0 or h is None:  # without data, shared=-1 keeps no neuron shared
            n_shared = int(round(max(opts.shared, 0.0) * neurons))
        else:  # neurons on for at least half the tokens at the target density, at most a quarter
            n_shared = min(int(np.sum(rates >= 0.5)), neurons // 4)
        shared = np.sort(np.argsort(-rates, kind="stable")[:n_shared])
        routed = np.setdiff1d(np.arange(neurons), shared)
        per_expert = -(-len(routed) // opts.experts)
        padding = per_expert * opts.experts - len(routed)
        features = h[:, routed].T if (opts.split == "coactivation" and h is not None) else first[routed]
        padded = np.concatenate([features, np.zeros((padding, features.shape[1]), features.dtype)])
        labels = mx.balanced_kmeans(np.abs(padded) if opts.split == "coactivation" else padded, opts.experts,
                                    seed=seed)
        slots = np.concatenate([routed, np.full(padding, -1)])  # -1: a zero neuron
        experts = [slots[labels == e] for e in range(opts.experts)]
        real = [idx[idx >= 0] for idx in experts]
        mass = mx.expert_mass(h, down, real) if h is not None else None
        if opts.router == "linear" and x is not None:
            weight, bias = mx.fit_linear_router(x, mass)
        else:  # the gate rows (what the activation looks at), or the up rows of a plain FFN
            weight, bias = mx.centroid_router(_first_rows(block, gate_only=True), real), None
        logits = x @ weight + (0 if bias is None else bias) if x is not None else None
        quality = mx.router_quality(logits, mass, opts.k) if logits is not None else None
        plan = ExpertPlan(shared, experts, weight, bias, padding, quality, float(np.mean(rates)))
        if opts.refit and opts.k < opts.experts and h is not None:
            if len(h) >= REFIT_TOKENS_PER_NEURON * (neurons + 1):
                keep = mx.routed_mask(logits, opts.k, real, shared, neurons)
                plan.down, plan.down_bias, plan.refit_error = mx.refit_down(h, keep, down, opts.damp)
            else:
                site.notes.append(f"no refit: {len(h)} calibration tokens, {REFIT_TOKENS_PER_NEURON * (neurons + 1)}"
                                  f" needed ({REFIT_TOKENS_PER_NEURON} per neuron); give more --calib-samples")
        return plan


@dataclass
class ExpertPlan:
    shared: np.ndarray  # neuron indices kept always on
    experts: list[np.ndarray]  # per expert its neuron indices; -1 marks a zero (padding) neuron
    router_weight: np.ndarray  # (H, E)
    router_bias: np.ndarray | None  # (E,)
    padding: int
    quality: mx.RouterQuality | None
    mean_rate: float
    down: np.ndarray | None = None  # refit down projection (I, out), when refit
    down_bias: np.ndarray | None = None  # (out,): what the dropped experts contributed on average
    refit_error: tuple[float, float] | None = None  # calibration output error before / after the refit

    def down_weight(self, block: FfnBlock) -> np.ndarray:
        return self.down if self.down is not None else block.down.weight.numpy()


def _rows(array: np.ndarray, feed) -> np.ndarray:
    """(tokens, features), padding tokens (attention_mask 0) dropped."""
    mask = feed.get("attention_mask")
    if mask is not None and array.ndim == 3 and array.shape[:2] == mask.shape:
        return array[mask.astype(bool)]
    return array.reshape(-1, array.shape[-1])


def _first_rows(block: FfnBlock, gate_only: bool = False) -> np.ndarray:
    """The neurons' first-layer weights as rows (I, H); gated FFNs: gate and up side by side."""
    rows = [e.to_matrix(e.weight.numpy()).astype(np.float32) for e in
            ([block.gate or block.up] if gate_only else [p for p in (block.gate, block.up) if p is not None])]
    return np.concatenate(rows, axis=1)


def _site_record(site: MoeSite, plan: ExpertPlan, opts: MoEOptions, pass_id: str, anchor: ir.Node) -> SiteRecord:
    block = site.block
    active = (len(plan.shared) + opts.k * len(plan.experts[0])) / block.hidden
    q = plan.quality
    message = (f"{pass_id}: {len(plan.shared)} shared neurons + {opts.experts} experts of {len(plan.experts[0])},"
               f" {opts.k} active per token ({active:.0%} of {block.hidden} neurons), {site.lowering} lowering")
    details = {"lowering": site.lowering, "activation": block.kind, "experts": opts.experts, "k": opts.k,
               "shared": len(plan.shared), "expert_size": len(plan.experts[0]), "padding": plan.padding,
               "active_fraction": active, "notes": site.notes}
    if q is not None:
        details.update({"router_recall": q.recall, "expert_load": q.load, "load_imbalance": q.imbalance})
    if plan.refit_error is not None:
        details.update({"output_error_before_refit": plan.refit_error[0], "output_error": plan.refit_error[1]})
    params = sum(int(np.prod(e.weight.shape)) for e in block.entries) + int(np.prod(block.down.weight.shape))
    return SiteRecord(site=block.label, node=anchor.name or "", action="changed", message=message,
                      weight=block.down.weight.name, params=params, sparsity_before=0.0,
                      sparsity_after=1 - active, details=details)


def dense_captures(model: ir.Model, ctx: PassContext, directory) -> dict[str, tuple[str, str]]:
    """Every FFN's calibration input and hidden units in the unpruned ``model``, captured in one
    staged run and saved under ``directory`` (SmolLM2: 140 MB an FFN, so on disk, read back
    memory-mapped), by FFN input name. Put under ``ctx.extras[DENSE_CAPTURES]``, the ``moe``
    pass on a copy of the model fits each FFN's experts and router from there instead of running
    the model up to it: the planner fits every MoE option from one capture (an option over
    several FFNs fits the later ones on the unpruned upstream; the compile refits them)."""
    from pathlib import Path

    found = FfnToMoePass().match(model, ctx, FfnToMoePass().new_record())
    order = {node: i for i, node in enumerate(model.graph)}
    runner = ctx.runner.staged(model, ctx.calibration.feeds, progress=ctx.progress)
    out = {}
    for i, site in enumerate(sorted(found, key=lambda s: order[s.block.down.node])):
        name = site.block.input.name
        if name in out:
            continue
        x, h = FfnToMoePass._capture(runner, site, ctx.calibration.feeds)
        runner.unpin(site.block.input)
        paths = (str(Path(directory) / f"ffn{i}.x.npy"), str(Path(directory) / f"ffn{i}.h.npy"))
        np.save(paths[0], x)
        np.save(paths[1], h)
        out[name] = paths
    return out
