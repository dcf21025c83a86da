"""Channel permutation for N:M pruning: reorder a weight's input channels so N:M groups keep more.

N:M keeps N of every M consecutive weights along the reduction axis K. Which channels share a
group is an accident of the export; permuting K (Pool and Yu 2021; RIA, Zhang et al. 2024)
puts important channels in different groups, so fewer of them are lost. The permutation is an
exact rewrite only where the producer of the layer's input can be permuted to match:

* an FFN's down projection: its input channels are the hidden neurons, so the up (and gate)
  projections' output columns, their biases and every per-neuron constant between them move
  with it (the ``ffn`` region of :mod:`.structured_patterns`);
* attention's output projection: its input channels are (head, channel within the head); the
  value projection's output columns (and bias) are permuted inside each KV head, and the output
  projection's rows of every query head that reads that KV head with the same permutation.
  Heads themselves do not move (Q and K would have to follow; RoPE pairs their channels).

Anything else (a Q/K/V or up/gate projection reading a normalized residual stream, a producer
shared with other readers, a non-elementwise op in between, a KV cache whose layout is fixed by
graph inputs and outputs, a quantized weight) cannot absorb it: the site is recorded with
``PERMUTATION_UNABSORBED`` and pruned unpermuted.

The search maximizes the score N:M keeps (the pruning method's importance: |W| for magnitude,
|W| * ||X_j|| for wanda and sparsegpt). It starts from the better of the identity and a
striped order (channels sorted by total score, dealt round-robin over the groups), then swaps
channels between random pairs of groups while a swap gains. Swaps only ever gain, so the
objective is never below the unpermuted one. The search is bounded by a number of rounds (not
time, so a compile stays reproducible for a seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sparsec.graph import add_constant, constant_ref, mark_changed

from . import structured_patterns as sp
from .blocks import match_attention_block
from .patterns import Code, LinearWeight, MatchFailure
from .quantized import EncodedWeight


@dataclass
class Absorber:
    """Where a permutation of ``site``'s input channels is absorbed.

    ``segments`` lists, per independent search, the K indices it permutes: one list of all K
    columns for an FFN; for attention one (query heads in the group, head_dim) array per KV
    head, whose rows share one permutation of the head's channels.
    """

    site: LinearWeight
    region: sp.Region
    kind: str  # ffn | heads
    segments: list[np.ndarray]
    v_slices: list[sp.Slice] | None = None  # heads: the value projection's weight and bias
    head_dim: int = 0


def match_absorber(site: LinearWeight, model: ir.Model) -> Absorber | MatchFailure:
    """The producer that can absorb a permutation of ``site``'s input channels, or why none."""
    def unabsorbed(message: str) -> MatchFailure:
        return MatchFailure(Code.PERMUTATION_UNABSORBED, message, site.node)

    if isinstance(site.weight, EncodedWeight):
        return unabsorbed(f"'{site.weight.name}' is stored {site.weight.form}; its producer cannot be permuted"
                          " in that form")
    if site.op != "MatMul" or site.input_index != 1 or len(site.weight.shape) != 2:
        return unabsorbed("only a MatMul with a 2-D weight on the right (X @ W) is permuted")
    if len(site.weight.readers) != 1:
        return unabsorbed(f"'{site.weight.name}' is shared by {len(site.weight.readers)} nodes")
    region = sp.match_ffn(site.node)
    if region:
        if any(isinstance(s.ref, EncodedWeight) for s in region.tensors()):
            return unabsorbed("the FFN's entry weights are stored quantized")
        return Absorber(site, region, "ffn", [np.arange(site.matrix_shape[1])])
    ffn_failure = region
    block = match_attention_block(site.node, model)
    if not block:
        x = site.node.inputs[0]
        if _normalized(x):
            return unabsorbed(f"input '{x.name}' is a normalized residual stream: the normalization and the"
                              " residual adds mix every channel")
        producer = x.producer()
        what = f"'{producer.op_type}' node '{producer.name}'" if producer is not None else "a graph input"
        return unabsorbed(f"input comes from {what}: not an FFN's exit ({ffn_failure.code}: {ffn_failure.message})"
                          f" nor attention's output projection ({block.code})")
    if block.past_value is not None or block.present_value is not None:
        return unabsorbed("the value heads are read from or written to a KV cache (graph inputs / outputs"
                          " fix their channel order)")
    region = sp.attention_region(block)
    if not region:
        return unabsorbed(f"attention's value/output pair cannot be rewritten ({region.code}: {region.message})")
    v_weight = block.v.site.weight.value
    v_slices = [s for s in region.entries if s.ref.value is v_weight]
    v_slices += [s for s in region.others if block.v.bias is not None and s.ref.value is block.v.bias.value]
    hd, group = block.head_dim, block.group
    segments = [np.stack([np.arange((g * group + j) * hd, (g * group + j + 1) * hd) for j in range(group)])
                for g in range(block.kv_heads)]
    return Absorber(site, region, "heads", segments, v_slices, hd)


_NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                    "SkipSimplifiedLayerNormalization", "RMSNormalization", "ReduceMean"})


def _normalized(value: ir.Value, depth: int = 8) -> bool:
    """Whether ``value`` is (a few element-wise ops after) a LayerNorm / RMSNorm."""
    stack, seen = [(value, 0)], set()
    while stack:
        v, d = stack.pop()
        producer = v.producer()
        if producer is None or producer in seen or d > depth:
            continue
        seen.add(producer)
        if producer.op_type in _NORMS:
            return True
        if producer.op_type in ("Mul", "Div", "Add", "Sub", "Sqrt", "Reciprocal", "Pow", "Cast"):
            stack.extend((i, d + 1) for i in producer.inputs if i is not None and constant_ref(i) is None)
    return False


# --- the search ------------------------------------------------------------------------------

def kept_score(score: np.ndarray, n: int, m: int) -> float:
    """The score N:M keeps of a (rows, K) score matrix: the top N of every M along K."""
    rows, k = score.shape
    groups = np.sort(score.reshape(rows, k // m, m), axis=-1)
    return float(groups[..., m - n:].sum(dtype=np.float64))


def search_permutation(score: np.ndarray, n: int, m: int, *, rounds: int = 20, patience: int = 3,
                       seed: int = 0) -> np.ndarray:
    """A permutation ``p`` of the K columns of ``score`` (rows, K) such that
    ``kept_score(score[:, p])`` is at least ``kept_score(score)``."""
    import torch

    rows, k = score.shape
    groups = k // m
    score = np.ascontiguousarray(score, dtype=np.float32)
    identity = np.arange(k)
    if groups < 2:
        return identity
    order = np.argsort(-score.sum(0), kind="stable")
    striped = order.reshape(m, groups).T.reshape(-1)
    perm = max((identity, striped), key=lambda p: kept_score(score[:, p], n, m)).copy()
    slots = perm.reshape(groups, m)  # a view: swaps below write into perm
    s = torch.from_numpy(score)
    # Swap (i, j) of groups a and b: a's slot i takes b's column j and vice versa; columns index
    # the concatenation [a's m columns, b's m columns].
    swap_a = torch.tensor([[m + j if c == i else c for c in range(m)] for i in range(m) for j in range(m)])
    swap_b = torch.tensor([[i if c == j else m + c for c in range(m)] for i in range(m) for j in range(m)])
    rng = np.random.default_rng(seed)
    idle = 0
    for _ in range(rounds):
        pairs = rng.permutation(groups)[:groups // 2 * 2].reshape(-1, 2)
        a, b = pairs[:, 0], pairs[:, 1]
        both = torch.cat([s[:, torch.from_numpy(slots[a])], s[:, torch.from_numpy(slots[b])]], dim=-1)  # (rows, P, 2m)
        base = both[..., :m].topk(n, dim=-1).values.sum((0, 2)) + both[..., m:].topk(n, dim=-1).values.sum((0, 2))
        after = (both[..., swap_a].topk(n, dim=-1).values.sum((0, 3))
                 + both[..., swap_b].topk(n, dim=-1).values.sum((0, 3)))  # (P, m * m)
        gain, best = (after - base[:, None]).max(1)
        # A swap must gain more than the float32 noise of the two groups' sums.
        take = (gain > 1e-5 * base.clamp_min(1e-30)).numpy()
        if not take.any():
            idle += 1
            if idle >= patience:
                break
            continue
        idle = 0
        i, j = np.divmod(best.numpy()[take], m)
        ga, gb = a[take], b[take]
        slots[ga, i], slots[gb, j] = slots[gb, j].copy(), slots[ga, i].copy()
    return perm


def absorber_permutation(absorber: Absorber, score: np.ndarray, n: int, m: int, *, rounds: int,
                         seed: int) -> np.ndarray:
    """The permutation of all K input channels: one search per segment (see :class:`Absorber`)."""
    k = score.shape[1]
    perm = np.arange(k)
    for s, segment in enumerate(absorber.segments):
        if segment.ndim == 1:
            perm[segment] = segment[search_permutation(score[:, segment], n, m, rounds=rounds, seed=seed + s)]
            continue
        # Query heads sharing a KV head share its permutation: search their rows together.
        stacked = np.concatenate([score[:, cols] for cols in segment], axis=0)
        local = search_permutation(stacked, n, m, rounds=rounds, seed=seed + s)
        for cols in segment:
            perm[cols] = cols[local]
    return perm


# --- the rewrite -----------------------------------------------------------------------------

def _own_copy(s: sp.Slice, anchor: ir.Node) -> None:
    """Give the region its own copy of a constant other nodes read too (merged by an exporter)."""
    if s.shared:
        clone = add_constant(anchor.graph, f"{s.ref.name}.{anchor.name}", s.ref.numpy())
        for node, index in s.readers:
            node.replace_input_with(index, clone)
        s.ref = constant_ref(clone)


def apply_permutation(absorber: Absorber, perm: np.ndarray, pass_id: str, reason: str) -> None:
    """Permute the site's input channels by ``perm`` (new channel i = old channel perm[i]) and
    its producer to match, in place. Exact: the site's output is unchanged."""
    region, site = absorber.region, absorber.site
    if absorber.kind == "ffn":
        moved = [(s, perm) for s in region.tensors()]
    else:
        # The value heads: channel c of KV head g moves like the output rows of its query heads.
        hd = absorber.head_dim
        v_perm = np.concatenate([g * hd + perm[seg[0]] - seg[0][0] for g, seg in enumerate(absorber.segments)])
        moved = [(region.exit, perm)] + [(s, v_perm) for s in absorber.v_slices]
    for s, index in moved:
        _own_copy(s, site.node)
        s.ref.replace(np.ascontiguousarray(np.take(s.ref.numpy(), index, axis=s.axis)))
        for use in s.ref.value.uses():
            mark_changed(use.node, pass_id, reason)
