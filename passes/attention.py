"""``attention``: sparse attention patterns inserted into exported graphs, and decoder attention
fused into ONNX Runtime's GroupQueryAttention.

Sites: attention blocks as :func:`~.blocks.match_attention_block` finds them (decomposed
``MatMul(Q, K^T) -> scale -> [mask] -> Softmax -> MatMul(V)``, rotary embeddings, grouped KV
heads, a KV cache concatenated in front of the new keys), and attention ops that are already
fused (``com.microsoft`` GroupQueryAttention, MultiHeadAttention, Attention; the ONNX
Attention op of opset 23). What the model's own mask does is found by running it on a probe
input: causal (a decoder), all-allowed (an encoder; padding comes with real inputs), or
something else (left alone).

Lowerings (``lowering``; ``auto`` picks the first that applies):

* ``gqa`` -- decoders: the block becomes one ``com.microsoft.GroupQueryAttention`` (rotary
  tables from the model's own rotary subgraph, evaluated for positions 0..max_positions-1; the
  scale from its constants; the KV cache kept as it was: ``past_key_values.*`` in BNSH,
  ``present.*`` out). Exact with no pattern. A window becomes ``local_window_size``; with
  ``cache=window`` also ``sliding_window_cache``: past and present hold only the last W keys,
  so KV memory and per-token time stop growing with the context (see :mod:`sparsec.runtime.decode`
  for the loop). Other patterns go in as an ``attention_bias`` built from the run-time lengths.
* ``mask`` -- any decomposed block (encoders included): the pattern's additive bias, built in the
  graph from the run-time lengths, is added to the scores before the softmax. Fidelity only:
  every score is still computed.

Fused ops already in the graph take the pattern in place: GroupQueryAttention's
``local_window_size`` for a window (else its ``attention_bias``), the ``attention_bias`` of
MultiHeadAttention and com.microsoft Attention, the ``attn_mask`` of ONNX Attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sparsec.errors import OptionError
from sparsec.feeds import input_specs, is_kv_cache_name, random_feeds
from sparsec.graph import add_constant, fresh_name, mark_changed, node_label, remove_dead
from sparsec.pipeline import (
    REORDER_TOLERANCE,
    Kind,
    Pass,
    PassContext,
    PassOptions,
    PassRecord,
    SiteRecord,
    option,
    register,
)
from sparsec.targets import ATTENTION_BLOCK_SPARSE, ATTENTION_WINDOW, KV_WINDOW, MASKED
from sparsec.runtime.kvcache import KV_CAPACITY_KEY, KV_HEAD_PADDING_KEY, KV_SHARED_KEY, pad_heads, present_of
from sparsec.verify import MAX_POSITIONS_KEY

from .attention_patterns import Pattern, emit_bias, lengths_of, load_layout
from .blocks import MS_DOMAIN, AttentionBlock, match_attention_block
from .moe_lowering import MS
from .patterns import Code, MatchFailure, select
from .rewrite import Builder, redirect

MIN_OPSET = 13
SPARSE_HEAD = 128  # SparseAttention's CUDA kernel takes this head size only: smaller heads are zero-padded
PROBE_QUERIES, PROBE_PAST = 5, 3
FUSED_OPS = {(MS_DOMAIN, "GroupQueryAttention"), (MS_DOMAIN, "MultiHeadAttention"), (MS_DOMAIN, "Attention"),
             ("", "Attention")}


@dataclass(frozen=True)
class AttentionOptions(PassOptions):
    window: int = option(-1, "each query sees the W most recent keys, itself included (encoders: |q - k| < W);"
                         " -1: no window", min=-1, search=(256, 512, 1024))
    sinks: int = option(0, "the first tokens every query sees (attention sinks; in encoders, global tokens such"
                        " as CLS that also see every key)", min=0)
    stride: int = option(0, "also the keys at distances that are multiples of this (strided pattern)", min=0)
    block: int = option(0, "block size of a block-sparse layout (16, 32, 64 or 128; 0: none)", min=0, max=128)
    local_blocks: int = option(0, "block-sparse: the most recent key blocks each query block sees (encoders: on"
                               " each side)", min=0)
    global_blocks: int = option(0, "block-sparse: the first key blocks every query block sees", min=0)
    random_blocks: int = option(0, "block-sparse: random earlier key blocks per query block (BigBird)", min=0)
    layout: str = option("", "block-sparse: a (blocks x blocks) 0/1 layout file (.npy or text)")
    cache: str = option("full", "window: decode keeps only the last `window` keys (GroupQueryAttention's"
                        " sliding_window_cache), so KV memory and time per token stop growing; full: every key",
                        choices=("full", "window"))
    lowering: str = option("auto", "gqa: fused com.microsoft.GroupQueryAttention (decoders); sparse:"
                           " com.microsoft.SparseAttention, which skips the blocks a block layout leaves out"
                           " (decoders; fast on CUDA only; the KV cache becomes one shared buffer); mask: an"
                           " additive bias on the scores (any model, no speed); auto: gqa where it applies, else"
                           " mask", choices=("auto", "gqa", "sparse", "mask"))
    max_positions: int = option(8192, "gqa and sparse: rows of the rotary tables (and the sparse layout's length), the"
                                " longest context the fused model runs",
                                min=16, max=1 << 20)
    seed: int = option(0, "random_blocks: seed of the random layout", min=0)
    include: tuple[str, ...] = option((), "glob patterns over the attention block's module path or node name")
    exclude: tuple[str, ...] = option((), "glob patterns of attention blocks left as they are")

    def validate(self) -> None:
        if self.window == 0:
            raise OptionError("attention: window must be at least 1 (or -1 for none)")
        if self.block not in (0, 16, 32, 64, 128):
            raise OptionError(f"attention: block must be 16, 32, 64 or 128 (or 0 for none), got {self.block}")
        if not self.block and (self.local_blocks or self.global_blocks or self.random_blocks or self.layout):
            raise OptionError("attention: local_blocks, global_blocks, random_blocks and layout need block=16..128")
        if self.cache == "window" and (self.window < 0 or self.sinks or self.stride or self.block):
            raise OptionError("attention: cache=window keeps the last `window` keys only: give window=W and no"
                              " sinks, stride or blocks (they would need keys the cache dropped)")
        if self.cache == "window" and self.lowering in ("mask", "sparse"):
            raise OptionError(f"attention: cache=window needs lowering=gqa (lowering={self.lowering} keeps every"
                              " key)")
        if self.lowering == "sparse" and not self.pattern().block_aligned:
            raise OptionError("attention: lowering=sparse takes a block layout only (block=16..128 with"
                              " local_blocks, global_blocks, random_blocks or layout; no window, sinks or stride)")

    def pattern(self) -> Pattern:
        layout = load_layout(self.layout) if self.layout else None
        return Pattern(self.window, self.sinks, self.stride, self.block, self.local_blocks, self.global_blocks,
                       self.random_blocks, layout, self.seed)


@dataclass
class AttentionSite:
    """A matched attention site: a decomposed block or a fused op."""

    node: ir.Node  # the output projection (decomposed) or the fused op
    label: str
    lowering: str  # gqa | mask | fused
    causal: bool
    block: AttentionBlock | None = None
    rotary: tuple[np.ndarray, np.ndarray] | None = None  # (cos, sin) tables (max_positions, D/2)
    scale: float | None = None
    layer: int = 0  # sparse lowering: the index of its KV buffers (past_key_values.{layer}.*)
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.label, self.node.name or "")


@register
class AttentionPass(Pass):
    """Sparse attention patterns; decoder attention fused into GroupQueryAttention."""

    id = "attention"
    summary = "sparse attention (window, sinks, strided, block-sparse) and fusion into GroupQueryAttention"
    kinds = (Kind.LOSSY, Kind.EXACT)
    matches = ("Q/K/V MatMuls -> scores -> [mask] -> Softmax -> context -> output MatMul; GroupQueryAttention,"
               " MultiHeadAttention and Attention ops")
    Options = AttentionOptions
    # GroupQueryAttention sums in another order than the decomposed graph: SmolLM2-135M's logits
    # (30 layers, fp32) move by up to 1.1e-3 on random inputs, 2.6e-4 on real text.
    reorder_tolerance = REORDER_TOLERANCE

    @property
    def kind(self) -> Kind:
        return Kind.EXACT if self.options.pattern().empty else Kind.LOSSY

    def sparse_form(self) -> str:
        opts: AttentionOptions = self.options  # type: ignore[assignment]
        pattern = opts.pattern()
        if opts.cache == "window":
            return KV_WINDOW
        if opts.lowering == "mask":
            return MASKED
        if pattern.empty:
            return "none"
        return ATTENTION_BLOCK_SPARSE if pattern.blocked else ATTENTION_WINDOW

    def match(self, model: ir.Model, ctx: PassContext, record: PassRecord) -> list[AttentionSite]:
        opts: AttentionOptions = self.options  # type: ignore[assignment]
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        blocks, sites = [], []
        for node in list(model.graph):
            if (node.domain or "", node.op_type) in FUSED_OPS or \
                    (node.domain == "ai.onnx" and node.op_type == "Attention"):
                found = self._fused_site(node, opts)
            elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                block = match_attention_block(node, model)
                if not block:
                    if block.code is not Code.NOT_A_REGION:
                        record.skip(block, node=node)
                    continue
                found = self._check_block(model, block, opts, opset)
                if not isinstance(found, MatchFailure):
                    blocks.append(block)
                    continue
            else:
                continue
            if isinstance(found, MatchFailure):
                record.skip(found, node=node)
            else:
                sites.append(found)
        if blocks:
            sites += self._probe(model, blocks, opts, ctx, record)
        order = {n: i for i, n in enumerate(model.graph)}
        return sorted(sites, key=lambda s: order.get(s.node, 0))

    def _check_block(self, model: ir.Model, block: AttentionBlock, opts: AttentionOptions,
                     opset: int) -> MatchFailure | None:
        failure = select(block, opts.include, opts.exclude)
        if failure is not None:
            return failure
        if block.scores is None or block.softmax is None or block.context is None:
            return MatchFailure(Code.UNKNOWN_LAYOUT, "cannot find the scores, softmax and context of the block",
                                block.node)
        if opset < MIN_OPSET:
            return MatchFailure(Code.OPSET_TOO_OLD, f"opset {opset} < {MIN_OPSET}", block.node)
        if block.node.graph is not model.graph:
            return MatchFailure(Code.IN_SUBGRAPH, "inside an If/Loop/Scan body", block.node)
        return None

    def _fused_site(self, node: ir.Node, opts: AttentionOptions) -> AttentionSite | MatchFailure:
        label = node_label(node)
        site = AttentionSite(node, label, "fused", causal=True)
        failure = select(site, opts.include, opts.exclude)
        if failure is not None:
            return failure
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if opts.cache == "window" and node.op_type != "GroupQueryAttention":
            return MatchFailure(Code.UNKNOWN_LAYOUT, f"{op} has no bounded KV cache (only GroupQueryAttention)", node)
        if node.op_type == "GroupQueryAttention":
            attr = node.attributes.get("causal")
            site.causal = attr is None or int(attr.value) == 1
            window = node.attributes.get("local_window_size")
            if window is not None and int(window.value) > 0:
                return MatchFailure(Code.ALREADY_SPARSE, f"already has local_window_size={int(window.value)}", node)
        elif node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("is_causal")
            site.causal = attr is not None and int(attr.value) == 1
        else:
            attr = node.attributes.get("unidirectional")
            site.causal = attr is not None and int(attr.value) == 1
        return site

    def _probe(self, model: ir.Model, blocks: list[AttentionBlock], opts: AttentionOptions, ctx: PassContext,
               record: PassRecord) -> list[AttentionSite]:
        """Run the blocks' masks and rotary tables on probe inputs: what each mask does, and the
        rotary tables the fused op needs."""
        from sparsec.runtime.staged import StagedRunner

        probe = _probe_feed(model, PROBE_QUERIES, PROBE_PAST)
        runner = StagedRunner(model, [probe], runner=ctx.runner)
        masks = {}
        for block in blocks:
            if block.mask is not None and block.mask not in masks:
                masks[block.mask] = next(runner.capture(block.mask))
        sites = []
        for block in blocks:
            mask = masks.get(block.mask)
            kind = _mask_kind(mask, block)
            if kind == "other":
                record.skip(MatchFailure(Code.UNKNOWN_LAYOUT, "the model's own mask is neither causal nor padding"
                                         " (it already restricts the keys)", block.node), node=block.node)
                continue
            causal = kind == "causal"
            site = AttentionSite(block.node, block.label, "mask", causal, block)
            if opts.lowering in ("auto", "gqa", "sparse"):
                fused = self._gqa_site(model, site, opts)
                if isinstance(fused, MatchFailure):
                    if opts.lowering != "auto":
                        record.skip(fused, node=block.node)
                        continue
                    site.notes.append(f"mask lowering: {fused.message}")
            sites.append(site)
        self._tables(model, [s for s in sites if s.lowering in ("gqa", "sparse") and s.block.rotary is not None],
                     opts, ctx)
        return sites

    def _gqa_site(self, model: ir.Model, site: AttentionSite, opts: AttentionOptions) -> AttentionSite | MatchFailure:
        block = site.block
        if not site.causal:
            return MatchFailure(Code.UNKNOWN_LAYOUT, "not a causal decoder block (GroupQueryAttention fuses decoders)",
                                block.node)
        dtype = block.q.site.weight.dtype
        if dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return MatchFailure(Code.DTYPE_UNSUPPORTED, f"{dtype}: the CPU kernel takes float32 and float16",
                                block.node)
        if block.head_dim % 8:
            return MatchFailure(Code.UNKNOWN_LAYOUT, f"head size {block.head_dim} is not a multiple of 8", block.node)
        if (block.past_key is None) != (block.present_key is None) or \
                (block.past_key is None) != (block.past_value is None):
            return MatchFailure(Code.UNKNOWN_LAYOUT, "a KV cache without its past or present half", block.node)
        scale = _scale(block)
        if isinstance(scale, MatchFailure):
            return scale
        if block.rotary is not None and not _rotate_half(block):
            return MatchFailure(Code.UNKNOWN_LAYOUT, "rotary embedding is not the rotate-half form", block.node)
        if opts.lowering == "sparse":
            if block.head_dim > SPARSE_HEAD or block.head_dim % 16:
                return MatchFailure(Code.UNKNOWN_LAYOUT, f"head size {block.head_dim}: SparseAttention takes heads of"
                                    f" a multiple of 16 up to {SPARSE_HEAD}", block.node)
            if block.past_key is not None and not block.past_key.is_graph_input():
                return MatchFailure(Code.UNKNOWN_LAYOUT, "the KV cache is not one graph input per layer (a stacked"
                                    " cache cannot become SparseAttention's shared buffers)", block.node)
            if block.past_key is not None and _mask_input(model) is None:
                return MatchFailure(Code.UNKNOWN_LAYOUT, "a KV cache without an attention_mask (the shared buffer's"
                                    " length no longer tells the positions)", block.node)
        site.scale, site.lowering = scale, "gqa" if opts.lowering != "sparse" else "sparse"
        return site

    def _tables(self, model: ir.Model, sites: list[AttentionSite], opts: AttentionOptions, ctx: PassContext) -> None:
        """The rotary (cos, sin) tables of positions 0..max_positions-1, from the model's own subgraph."""
        if not sites:
            return
        from sparsec.runtime.staged import StagedRunner

        probe = _probe_feed(model, opts.max_positions, 0)
        runner = StagedRunner(model, [probe], runner=ctx.runner)
        tables: dict[ir.Value, np.ndarray] = {}
        for site in sites:
            for value in site.block.rotary:
                if value not in tables:
                    tables[value] = next(runner.capture(value))
            cos, sin = (tables[v] for v in site.block.rotary)
            site.rotary = (_half_table(cos, site.block.head_dim, opts.max_positions),
                           _half_table(sin, site.block.head_dim, opts.max_positions))

    def run(self, model: ir.Model, ctx: PassContext) -> PassRecord:
        opts: AttentionOptions = self.options  # type: ignore[assignment]
        pattern = opts.pattern()
        record = self.new_record()
        sites = self.match(model, ctx, record)
        sequence = _static_sequence(model)
        for site in sites:
            pattern.check(site.causal, sequence)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        for layer, site in enumerate(s for s in sites if s.lowering == "sparse"):
            site.layer = layer
        changed = []
        for site in sites:
            if site.lowering == "mask" and pattern.empty:
                record.skip(MatchFailure(Code.NOTHING_TO_REMOVE, "no pattern given and the block does not fuse"
                                         f" ({'; '.join(site.notes) or 'not a decoder'})", site.node), node=site.node)
                continue
            lower = {"gqa": _lower_gqa, "sparse": _lower_sparse, "mask": _lower_mask, "fused": _lower_fused}[
                site.lowering]
            anchor = lower(model, site, pattern, opts, self.id, opset)
            if isinstance(anchor, MatchFailure):
                record.skip(anchor, node=site.node)
                continue
            changed.append(site)
            record.sites.append(SiteRecord(
                site=site.label, node=anchor.name or "", action="changed",
                message=f"{self.id}: {pattern.describe()}, {site.lowering} lowering"
                        f"{', bounded KV cache' if opts.cache == 'window' else ''}",
                weight="", params=0, sparsity_before=0.0, sparsity_after=0.0,
                details={"lowering": site.lowering, "causal": site.causal, "pattern": pattern.describe(),
                         "cache": opts.cache, "notes": site.notes}))
        if any(s.lowering == "sparse" or (s.lowering == "gqa" and s.rotary is not None) for s in changed):
            model.metadata_props[MAX_POSITIONS_KEY] = str(opts.max_positions)
        if changed and opts.cache == "window":
            model.metadata_props[KV_CAPACITY_KEY] = str(opts.window)
        remove_dead(model.graph, [n for s in changed if s.block is not None
                                  for n in (*s.block.core, s.block.reshape, s.block.transpose)])
        sparse = [s for s in changed if s.lowering == "sparse"]
        if sparse:
            _shared_cache(model, sparse, opts)
        if sparse or (changed and opts.cache == "window"):
            _check_cache_readers(model)
        return record


# --- probing -----------------------------------------------------------------------------------

def _probe_feed(model: ir.Model, queries: int, past: int) -> dict[str, np.ndarray]:
    """One input set: ``queries`` new tokens after ``past`` cached ones, masks all ones."""
    specs = input_specs(model)
    dims = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if not isinstance(dim, str):
                continue
            if spec.role == "past" or is_kv_cache_name(spec.name):
                if axis == 2:
                    dims.setdefault(dim, past)
            elif axis == 0:
                dims.setdefault(dim, 1)
            elif spec.role != "mask":
                dims.setdefault(dim, queries)
    for spec in specs:  # the mask spans past + new tokens
        if spec.role == "mask" and len(spec.shape) == 2 and isinstance(spec.shape[1], str):
            dims.setdefault(spec.shape[1], past + queries)
    (feed,) = random_feeds(specs, seed=0, dims=dims)
    return feed


def _static_sequence(model: ir.Model) -> int | None:
    """The sequence length when the model fixes it: axis 1 of its first token-like input."""
    for value in model.graph.inputs:
        name = value.name or ""
        if value.is_initializer() or is_kv_cache_name(name) or "mask" in name.lower() or value.shape is None \
                or len(value.shape) < 2:
            continue
        return value.shape[1] if isinstance(value.shape[1], int) else None
    return None


def _mask_kind(mask: np.ndarray | None, block: AttentionBlock) -> str:
    """causal | open | other, for what the model's mask does on the probe (no padding)."""
    if mask is None:
        return "causal" if block.causal else "open"
    if mask.dtype == np.bool_:
        allowed = mask
    else:
        allowed = mask > np.finfo(mask.dtype).min / 2 if np.issubdtype(mask.dtype, np.floating) else mask != 0
        if np.issubdtype(mask.dtype, np.floating) and np.any((mask != 0) & allowed):
            return "other"  # a bias, not a mask
    s, t = allowed.shape[-2:]
    grid = np.broadcast_to(allowed, allowed.shape[:-2] + (s, t)).reshape(-1, s, t)
    if grid.all():
        return "open"
    causal = np.arange(t)[None, :] <= np.arange(t - s, t)[:, None]
    return "causal" if all(np.array_equal(g, causal) for g in grid) else "other"


def _half_table(full: np.ndarray, head_dim: int, rows: int) -> np.ndarray:
    """(positions, D) duplicated halves -> (positions, D/2) as GroupQueryAttention takes them."""
    table = full.reshape(-1, full.shape[-1])[-rows:] if full.ndim > 2 else full
    half = table.shape[-1] // 2
    if table.shape[-1] != head_dim or not np.array_equal(table[:, :half], table[:, half:]):
        raise OptionError("attention: the rotary tables are not the duplicated-halves form GroupQueryAttention"
                          " takes; use lowering=mask")
    return np.ascontiguousarray(table[:rows, :half])


def _scalar(value: ir.Value | None) -> float | None:
    from sparsec.graph import constant_ref

    ref = constant_ref(value)
    if ref is None or int(np.prod(ref.shape)) != 1:
        return None
    return float(np.asarray(ref.numpy()).reshape(-1)[0])


def _scale(block: AttentionBlock) -> float | MatchFailure:
    """The factor the scores get: scalar constants multiplied (or divided) into Q, K or the
    scores before the softmax."""
    from .blocks import _forward

    before = {n for n in block.core if block.scores in _forward(n.outputs[0], block.core) or n is block.scores}
    between = _forward(block.scores.outputs[0], block.core) - _forward(block.softmax.outputs[0], block.core) \
        - {block.softmax}
    scale = 1.0
    for node in before | between:
        if node.op_type not in ("Mul", "Div"):
            continue
        consts = [(i, _scalar(v)) for i, v in enumerate(node.inputs)]
        found = [(i, c) for i, c in consts if c is not None]
        if not found:
            continue
        index, c = found[0]
        scale *= c if node.op_type == "Mul" else (1.0 / c if index == 1 else float("nan"))
    for node in between:
        if node.op_type not in ("Mul", "Div", "Add", "Where", "Cast", "Identity", "Reshape", "Expand"):
            return MatchFailure(Code.UNKNOWN_LAYOUT, f"{node.op_type} between the scores and the softmax", node)
    if not np.isfinite(scale) or scale <= 0:
        return MatchFailure(Code.UNKNOWN_LAYOUT, "cannot tell the scale of the scores", block.node)
    return scale


def _rotate_half(block: AttentionBlock) -> bool:
    """The rotation is x * cos + rotate_half(x) * sin: a Neg of the second half concatenated
    before the first half."""
    negs = [n for n in block.core if n.op_type == "Neg"]
    return bool(negs) and all(any(u.node.op_type == "Concat" and u.idx == 0 for u in n.outputs[0].uses())
                              for n in negs)


# --- lowerings ---------------------------------------------------------------------------------

def _mask_input(model: ir.Model) -> ir.Value | None:
    for value in model.graph.inputs:
        if not value.is_initializer() and "mask" in (value.name or "").lower() and value.shape is not None \
                and len(value.shape) == 2:
            return value
    return None


def _lower_gqa(model: ir.Model, site: AttentionSite, pattern: Pattern, opts: AttentionOptions, pass_id: str,
               opset: int) -> ir.Node | MatchFailure:
    block = site.block
    graph = model.graph
    dtype = block.q.site.weight.dtype.numpy()
    b = Builder(graph, f"{block.node.name}.gqa", pass_id, f"attention: GroupQueryAttention ({pattern.describe()})",
                opset)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    query, key, value = (p.reshape.inputs[0] for p in (block.q, block.k, block.v))
    mask = _mask_input(model)
    shape = b.one("Shape", [query])
    batch = b.one("Slice", [shape, b.const("z", i64(0)), b.const("o", i64(1))])
    new = b.one("Squeeze", [b.one("Slice", [shape, b.const("o2", i64(1)), b.const("t", i64(2))]), b.const("a0", i64(0))])
    if mask is not None:
        total = b.one("Squeeze", [b.one("Slice", [b.one("Shape", [mask]), b.const("o3", i64(1)), b.const("t2", i64(2))]),
                                  b.const("a1", i64(0))])
        seqlens = b.one("Sub", [b.one("ReduceSum", [b.one("Cast", [mask], to=ir.DataType.INT64), b.const("a2", i64(1))],
                                      keepdims=0), b.const("one", np.array(1, np.int64))])
    else:
        past = b.one("Squeeze", [b.one("Slice", [b.one("Shape", [block.past_key]), b.const("p2", i64(2)),
                                                 b.const("p3", i64(3))]), b.const("a3", i64(0))]) \
            if block.past_key is not None else b.const("nopast", np.array(0, np.int64))
        total = b.one("Add", [new, past])
        seqlens = b.one("Expand", [b.one("Sub", [total, b.const("one2", np.array(1, np.int64))]), batch])
    past_key, past_value = block.past_key, block.past_value
    if opts.cache == "window":
        if past_key is None or mask is None:
            return MatchFailure(Code.UNKNOWN_LAYOUT, "cache=window needs a model with KV-cache inputs and an"
                                " attention_mask (it carries the absolute length once the cache is bounded)",
                                block.node)
    inputs = [query, key, value, past_key, past_value, b.one("Cast", [seqlens], to=ir.DataType.INT32),
              b.one("Cast", [total], to=ir.DataType.INT32)]
    attrs = {"num_heads": block.heads, "kv_num_heads": block.kv_heads, "scale": float(site.scale)}
    if site.rotary is not None:
        inputs += [b.const("cos", site.rotary[0].astype(dtype)), b.const("sin", site.rotary[1].astype(dtype))]
        attrs.update(do_rotary=1, rotary_interleaved=0)
    if pattern.window_only:
        attrs["local_window_size"] = pattern.window
    elif not pattern.empty:
        bias = emit_bias(b, new, total, pattern, True, dtype)
        while len(inputs) < 10:
            inputs.append(None)
        inputs.append(b.one("Unsqueeze", [bias, b.const("a01", i64(0, 1))]))
    if opts.cache == "window":
        attrs["sliding_window_cache"] = 1
    out, present_key, present_value = b.op("GroupQueryAttention", inputs, outputs=3, domain=MS, **attrs)
    graph.insert_before(block.reshape, b.nodes)
    model.opset_imports.setdefault(MS, 1)
    redirect(graph, block.reshape.outputs[0], out)
    for old, new_value in ((block.present_key, present_key), (block.present_value, present_value)):
        if old is not None:
            redirect(graph, old, new_value)
    return out.producer()


def _lower_sparse(model: ir.Model, site: AttentionSite, pattern: Pattern, opts: AttentionOptions, pass_id: str,
                  opset: int) -> ir.Node:
    """The block as com.microsoft.SparseAttention: heads zero-padded to 128 (each half of a head
    in the first half of each half of the padded head, so the rotate-half rotary pairs the same
    elements; the extra table entries rotate zeros), the block layout as CSR constants covering
    max_positions, the KV cache one buffer per layer (past and present share it)."""
    block, graph = site.block, model.graph
    dtype = block.q.site.weight.dtype.numpy()
    d, heads, kv_heads, wide = block.head_dim, block.heads, block.kv_heads, SPARSE_HEAD
    b = Builder(graph, f"{block.node.name}.sparse_attention", pass_id,
                f"attention: SparseAttention ({pattern.describe()})", opset)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731

    removed = block.core | {block.reshape, block.transpose}

    def widen(p, n: int, tag: str) -> ir.Value:  # (B, S, n*d) -> (B, S, n*128)
        x = p.reshape.inputs[0]
        if p.bias is None and p.site.node.outputs[0] is x and all(u.node in removed or u.node is p.reshape for u in x.uses()):
            # the projection's own weight padded with zero columns: the MatMul writes the wide
            # heads (the old MatMul goes with the block)
            weight = p.site.weight.numpy()
            wide_weight = pad_heads(weight.reshape(weight.shape[0], n, d), wide).reshape(weight.shape[0], n * wide)
            padded = add_constant(graph, f"{p.site.weight.name}.heads{wide}", wide_weight)
            return b.one("MatMul", [p.site.node.inputs[0], padded])
        # else zeros concatenated (not Pad: ORT's CUDA Pad takes 17x as long, 0.98 against
        # 0.057 ms for SmolLM2's queries at 8k tokens on an H200)
        halves = b.one("Reshape", [x, b.const(f"{tag}.halves", i64(0, 0, n, 2, d // 2))])
        shape = b.one("Concat", [b.one("Slice", [b.one("Shape", [halves]), b.const(f"{tag}.z", i64(0)),
                                                 b.const(f"{tag}.four", i64(4))]),
                                 b.const(f"{tag}.pad", i64((wide - d) // 2))], axis=0)
        zeros = b.one("Expand", [b.const(f"{tag}.zero", np.zeros(1, dtype)), shape])
        padded = b.one("Concat", [halves, zeros], axis=4)
        return b.one("Reshape", [padded, b.const(f"{tag}.heads", i64(0, 0, n * wide))])

    query, key, value = (p.reshape.inputs[0] for p in (block.q, block.k, block.v))
    if d != wide:
        query, key, value = widen(block.q, heads, "q"), widen(block.k, kv_heads, "k"), widen(block.v, kv_heads, "v")
    mask = _mask_input(model)
    batch = b.one("Slice", [b.one("Shape", [query]), b.const("z", i64(0)), b.const("o", i64(1))])
    if mask is not None:  # the mask spans every position; its sum per row is each sequence's length
        total = b.one("Slice", [b.one("Shape", [mask]), b.const("o2", i64(1)), b.const("t", i64(2))])
        lengths = b.one("ReduceSum", [b.one("Cast", [mask], to=ir.DataType.INT64), b.const("a1", i64(1))],
                        keepdims=0)
    else:
        total = b.one("Slice", [b.one("Shape", [query]), b.const("o3", i64(1)), b.const("t3", i64(2))])
        lengths = b.one("Expand", [total, batch])
    blocks = -(-opts.max_positions // pattern.block)
    layout = pattern.block_layout(blocks, causal=True)
    rows = np.concatenate([[0], np.cumsum(layout.sum(axis=1))]).astype(np.int32)[None]
    cols = np.nonzero(layout)[1].astype(np.int32)[None]
    past_key, past_value = block.past_key, block.past_value
    buffer = ir.Shape([query.shape[0] if query.shape is not None else "batch", kv_heads, "kv_buffer", wide])
    if past_key is None:
        past_key, past_value = (ir.Value(name=fresh_name(graph, f"past_key_values.{site.layer}.{kind}"),
                                         type=ir.TensorType(block.q.site.weight.dtype), shape=buffer)
                                for kind in ("key", "value"))
        graph.inputs.extend([past_key, past_value])
    else:
        past_key.shape, past_value.shape = buffer, ir.Shape(list(buffer))
    inputs = [query, key, value, past_key, past_value, b.const("rows", rows), b.const("cols", cols),
              b.one("Cast", [total], to=ir.DataType.INT32), b.one("Cast", [lengths], to=ir.DataType.INT32)]
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(site.scale),
             "sparse_block_size": pattern.block}
    if site.rotary is not None:
        extra = wide // 2 - d // 2  # table entries that rotate the padding (zeros stay zeros)
        cos = np.concatenate([site.rotary[0], np.ones((len(site.rotary[0]), extra))], axis=1)
        sin = np.concatenate([site.rotary[1], np.zeros((len(site.rotary[1]), extra))], axis=1)
        inputs += [b.const("cos", cos.astype(dtype)), b.const("sin", sin.astype(dtype))]
        attrs.update(do_rotary=1, rotary_interleaved=0)
    out, present_key, present_value = b.op("SparseAttention", inputs, outputs=3, domain=MS, **attrs)
    if d != wide:  # (B, S, N*128) -> (B, S, N*d): the first half of each half of every head
        halves = b.one("Reshape", [out, b.const("o.halves", i64(0, 0, heads, 2, wide // 2))])
        kept = b.one("Slice", [halves, b.const("o.start", i64(0)), b.const("o.end", i64(d // 2)),
                               b.const("o.axis", i64(4))])
        out = b.one("Reshape", [kept, b.const("o.heads", i64(0, 0, heads * d))])
    graph.insert_before(block.reshape, b.nodes)
    model.opset_imports.setdefault(MS, 1)
    redirect(graph, block.reshape.outputs[0], out)
    for old, new_value, kind in ((block.present_key, present_key, "key"),
                                 (block.present_value, present_value, "value")):
        new_value.type, new_value.shape = ir.TensorType(block.q.site.weight.dtype), ir.Shape(list(buffer))
        if old is not None:
            redirect(graph, old, new_value)
            new_value.shape = ir.Shape(list(buffer))
        else:
            new_value.name = fresh_name(graph, present_of(f"past_key_values.{site.layer}.{kind}"))
            graph.outputs.append(new_value)
    return present_key.producer()


def _shared_cache(model: ir.Model, sites: list[AttentionSite], opts: AttentionOptions) -> None:
    """Metadata of a model whose KV cache is SparseAttention's shared buffers."""
    block = opts.pattern().block
    model.metadata_props[KV_SHARED_KEY] = str(-(-opts.max_positions // block) * block)
    head = sites[0].block.head_dim
    if head != SPARSE_HEAD:
        model.metadata_props[KV_HEAD_PADDING_KEY] = f"{head}:{SPARSE_HEAD}"


def _check_cache_readers(model: ir.Model) -> None:
    """A bounded or shared KV cache no longer has the past's length: every reader of a past input
    must be a fused attention op (a block left unfused, or a mask or position subgraph reading
    the cache's length, would now compute with the buffer's size)."""
    for value in model.graph.inputs:
        if not is_kv_cache_name(value.name or ""):
            continue
        for use in value.uses():
            if use.node.op_type not in ("GroupQueryAttention", "SparseAttention"):
                raise OptionError(f"attention: {node_label(use.node)} ({use.node.op_type}) still reads"
                                  f" {value.name}, whose length the bounded or shared KV cache no longer keeps;"
                                  " lower every attention block of the model (no include/exclude)")


def _lower_mask(model: ir.Model, site: AttentionSite, pattern: Pattern, opts: AttentionOptions, pass_id: str,
                opset: int) -> ir.Node:
    block = site.block
    softmax = block.softmax
    scores = softmax.inputs[0]
    dtype = scores.dtype.numpy() if scores.dtype is not None else np.float32
    b = Builder(model.graph, f"{block.node.name}.sparse", pass_id, f"attention: {pattern.describe()} (mask)", opset)
    s, t = lengths_of(b, scores)
    biased = b.one("Add", [scores, emit_bias(b, s, t, pattern, site.causal, dtype)])
    model.graph.insert_before(softmax, b.nodes)
    softmax.replace_input_with(0, biased)
    site.block = None  # nothing of the block goes
    return biased.producer()


def _lower_fused(model: ir.Model, site: AttentionSite, pattern: Pattern, opts: AttentionOptions, pass_id: str,
                 opset: int) -> ir.Node | MatchFailure:
    node, graph = site.node, model.graph
    if pattern.empty:
        return MatchFailure(Code.NOTHING_TO_REMOVE, "already fused and no pattern given", node)
    if node.op_type == "GroupQueryAttention" and (pattern.window_only or opts.cache == "window"):
        node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", pattern.window)
        if opts.cache == "window":
            node.attributes["sliding_window_cache"] = ir.AttrInt64("sliding_window_cache", 1)
        mark_changed(node, pass_id, f"attention: {pattern.describe()}")
        return node
    dtype = node.inputs[0].dtype.numpy() if node.inputs[0].dtype is not None else np.float32
    b = Builder(graph, f"{node.name}.sparse", pass_id, f"attention: {pattern.describe()} (bias)", opset)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    query = node.inputs[0]

    def length(value: ir.Value, axis: int, tag: str):  # one dimension of ``value`` as an int64 scalar
        return b.one("Squeeze", [b.one("Slice", [b.one("Shape", [value]), b.const(f"{tag}0", i64(axis)),
                                                 b.const(f"{tag}1", i64(axis + 1 if axis != -1 else 2 ** 62))]),
                                 b.const(f"{tag}ax", i64(0))])

    new = length(query, -2, "q")  # (B, S, hidden) and (B, N, S, H) alike
    if node.op_type == "GroupQueryAttention":
        total = b.one("Cast", [node.inputs[6]], to=ir.DataType.INT64)
        slot = 10
    else:
        # (bias slot, past input, its sequence axis): ONNX Attention (B, N, P, D) past_key; MHA the
        # same at input 6; com.microsoft Attention (2, B, N, P, D) at input 4.
        slot, past_index, axis = {("", "Attention"): (3, 4, 2), (MS_DOMAIN, "MultiHeadAttention"): (5, 6, 2),
                                  (MS_DOMAIN, "Attention"): (5, 4, 3)}[
            ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)]
        current = node.inputs[slot] if len(node.inputs) > slot else None
        if current is not None:
            total = length(current, -1, "m")  # a mask spans every key (padded ones included)
        else:
            past = node.inputs[past_index] if len(node.inputs) > past_index else None
            key = node.inputs[1] if node.op_type != "Attention" or node.domain in ("", "ai.onnx") else None
            rank = len(key.shape) if key is not None and key.shape is not None else None
            # the keys' own length (cross-attention may differ from the queries'): (B, L, D) and
            # packed (B, L, N, 2, H) on axis 1, (B, N, L, H) on axis 2; else self-attention
            keys = length(key, 1 if rank in (3, 5) else 2, "k") if rank in (3, 4, 5) else new
            total = b.one("Add", [keys, length(past, axis, "p")]) if past is not None else keys
    bias = emit_bias(b, new, total, pattern, site.causal, dtype)
    current = node.inputs[slot] if len(node.inputs) > slot else None
    if current is not None and current.dtype == ir.DataType.BOOL:
        return MatchFailure(Code.UNKNOWN_LAYOUT, "a boolean attention mask (only additive masks are combined)", node)
    bias = b.one("Unsqueeze", [bias, b.const("a01", i64(0, 1))])
    if current is not None:
        bias = b.one("Add", [current, bias])
    graph.insert_before(node, b.nodes)
    if len(node.inputs) <= slot:
        node.resize_inputs(slot + 1)
    node.replace_input_with(slot, bias)
    mark_changed(node, pass_id, f"attention: {pattern.describe()}")
    return node
