"""Sparse attention patterns: which keys each query may see, as numbers and as graph ops.

A :class:`Pattern` is a union of components, each optional:

* ``window`` W -- the W most recent keys including the query's own position (decoders:
  ``q - W < k <= q``, the convention of ONNX Runtime's GroupQueryAttention ``local_window_size``
  and Hugging Face's ``sliding_window``); encoders: ``|q - k| < W``.
* ``sinks`` G -- the first G tokens: every query sees them (StreamingLLM's attention sinks) and,
  in an encoder, they see every key (global tokens such as CLS).
* ``stride`` S -- keys at a distance that is a multiple of S (the strided pattern of Child et
  al.; with a window, their "fixed" factorization).
* ``block`` B with ``local_blocks`` L, ``global_blocks`` G_b and ``random_blocks`` R --
  block-sparse layouts on a grid of B x B blocks: the L most recent key blocks (encoders: L on
  each side), the first G_b key blocks, R random key blocks per query block (BigBird), or a
  block ``layout`` given as a 0/1 matrix (``.npy``).

Positions are absolute: with a KV cache of P tokens the S new queries are at P..P+S-1 and the
keys at 0..P+S-1 (bottom-right alignment, as every causal cache works). Decoders are also causal.
:meth:`Pattern.allowed` gives the boolean (S, T) matrix (the reference every lowering is tested
against); :func:`emit_bias` builds the additive bias in the graph from the run-time lengths, so
dynamic shapes keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

from sparsec.errors import OptionError

MAX_RANDOM_LAYOUT_BLOCKS = 1024  # the random block table covers sequences up to this many blocks


@dataclass(frozen=True)
class Pattern:
    window: int = -1
    sinks: int = 0
    stride: int = 0
    block: int = 0
    local_blocks: int = 0
    global_blocks: int = 0
    random_blocks: int = 0
    layout: np.ndarray | None = None  # (blocks, blocks) 0/1, from a file
    seed: int = 0

    @property
    def empty(self) -> bool:
        """No component: every key the model allowed stays allowed (fusion only)."""
        return (self.window < 0 and not self.sinks and not self.stride and not self.block)

    @property
    def window_only(self) -> bool:
        return self.window > 0 and not self.sinks and not self.stride and not self.block

    @property
    def blocked(self) -> bool:
        return self.block > 0

    def describe(self) -> str:
        parts = []
        if self.window > 0:
            parts.append(f"window {self.window}")
        if self.sinks:
            parts.append(f"{self.sinks} sink token{'s' if self.sinks > 1 else ''}")
        if self.stride:
            parts.append(f"stride {self.stride}")
        if self.block:
            what = "layout file" if self.layout is not None else ", ".join(
                f"{n} {k}" for n, k in ((self.local_blocks, "local"), (self.global_blocks, "global"),
                                        (self.random_blocks, "random")) if n)
            parts.append(f"blocks of {self.block} ({what})")
        return " + ".join(parts) or "dense"

    def check(self, causal: bool, sequence: int | None = None) -> None:
        """Raise OptionError when the pattern leaves a query with nothing to attend to, or a
        known sequence length is shorter than one block."""
        if self.block and sequence is not None and sequence < self.block:
            raise OptionError(f"attention: the sequence ({sequence} tokens) is shorter than one block of {self.block}")
        if self.layout is not None:
            empty = np.flatnonzero(~self._layout_rows(causal).any(axis=1))
            if empty.size:
                raise OptionError(f"attention: the block layout leaves query block {int(empty[0])} with nothing to"
                                  " attend to")
        if self.block and not causal and not (self.local_blocks or self.global_blocks or self.random_blocks
                                              or self.layout is not None or self.window > 0 or self.sinks
                                              or self.stride):
            raise OptionError("attention: blocks of a size but no blocks to keep (local_blocks, global_blocks,"
                              " random_blocks or layout)")

    def _layout_rows(self, causal: bool) -> np.ndarray:
        layout = self.layout.astype(bool)
        return np.tril(layout) if causal else layout

    def random_table(self, blocks: int = MAX_RANDOM_LAYOUT_BLOCKS) -> np.ndarray:
        """(blocks, blocks) 0/1: each query block's ``random_blocks`` random key blocks (earlier
        ones only, so that a decoder's choice does not depend on the sequence length)."""
        rng = np.random.default_rng(self.seed)
        table = np.zeros((blocks, blocks), bool)
        for q in range(blocks):
            if q:
                table[q, rng.choice(q, size=min(self.random_blocks, q), replace=False)] = True
        return table

    def allowed(self, queries: int, keys: int, causal: bool) -> np.ndarray:
        """(queries, keys) booleans: may query i (absolute position keys - queries + i) see key j."""
        q = np.arange(keys - queries, keys)[:, None]
        k = np.arange(keys)[None, :]
        ok = self.allowed_at(q, k, causal)
        return ok & (k <= q) if causal else ok

    def allowed_at(self, q: np.ndarray, k: np.ndarray, causal: bool) -> np.ndarray:
        """The pattern at absolute positions (broadcasting arrays), causality not applied."""
        if self.empty:
            return np.ones(np.broadcast(q, k).shape, bool)
        ok = np.zeros(np.broadcast(q, k).shape, bool)
        if self.window > 0:
            ok |= (q - k < self.window) if causal else (np.abs(q - k) < self.window)
        if self.sinks:
            ok |= k < self.sinks
            if not causal:
                ok |= q < self.sinks
        if self.stride:
            ok |= (q - k) % self.stride == 0
        if self.block:
            qb, kb = q // self.block, k // self.block
            if self.local_blocks:
                ok |= (qb - kb < self.local_blocks) if causal else (np.abs(qb - kb) < self.local_blocks)
            if self.global_blocks:
                ok |= kb < self.global_blocks
                if not causal:
                    ok |= qb < self.global_blocks
            if self.random_blocks:
                table = self.random_table()
                inside = (qb < len(table)) & (kb < len(table))
                ok |= inside & table[np.minimum(qb, len(table) - 1), np.minimum(kb, len(table) - 1)]
            if self.layout is not None:
                layout = self.layout.astype(bool)
                inside = (qb < len(layout)) & (kb < len(layout))
                ok |= inside & layout[np.minimum(qb, len(layout) - 1), np.minimum(kb, len(layout) - 1)]
        return ok

    def block_layout(self, blocks: int, causal: bool) -> np.ndarray:
        """(blocks, blocks) booleans: the key blocks each query block touches (SparseAttention's
        layout). Exact -- the kernel skips only what the pattern masks -- when
        :attr:`block_aligned`."""
        n = blocks * self.block
        grid = self.allowed(n, n, causal)
        return grid.reshape(blocks, self.block, blocks, self.block).any(axis=(1, 3))

    @property
    def block_aligned(self) -> bool:
        """Every component is whole blocks (SparseAttention can skip exactly what it masks)."""
        return self.blocked and self.window < 0 and not self.sinks and not self.stride


def load_layout(path: str) -> np.ndarray:
    """A block layout from a ``.npy`` (or ``.txt`` of 0/1 rows): (blocks, blocks), values 0/1."""
    file = Path(path)
    if not file.is_file():
        raise OptionError(f"attention: layout file {path} does not exist")
    try:
        layout = np.load(file) if file.suffix == ".npy" else np.loadtxt(file, dtype=np.int64, ndmin=2)
    except Exception as exc:  # numpy raises several types on malformed files
        raise OptionError(f"attention: cannot read the layout {path} ({exc}); give a .npy or a text file of"
                          " 0/1 rows") from None
    if layout.ndim != 2 or layout.shape[0] != layout.shape[1] or not np.isin(layout, (0, 1)).all():
        raise OptionError(f"attention: the layout in {path} must be a square matrix of 0 and 1, got shape"
                          f" {layout.shape}")
    return layout.astype(np.int8)


def lengths_of(b, scores) -> tuple[object, object]:
    """The query count S and key count T (int64 scalars) of ``scores`` (..., S, T)."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    shape = b.one("Shape", [scores])
    s = b.one("Squeeze", [b.one("Slice", [shape, b.const("m2", i64(-2)), b.const("m1", i64(-1))]),
                          b.const("ax0", i64(0))])
    t = b.one("Squeeze", [b.one("Slice", [shape, b.const("m1b", i64(-1)), b.const("big", i64(2 ** 62))]),
                          b.const("ax0b", i64(0))])
    return s, t


def emit_bias(b, s, t, pattern: Pattern, causal: bool, dtype) -> object:
    """Build, with the :class:`~.moe_lowering.Builder` ``b``, the additive bias (S, T) of
    ``pattern`` for S queries and T keys (int64 scalars, known at run time only): 0 where
    allowed, the dtype's lowest value elsewhere. Causality is left to the model's own mask."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    zero, one = b.const("zero", np.array(0, np.int64)), b.const("one", np.array(1, np.int64))
    keys = b.one("Unsqueeze", [b.one("Range", [zero, t, one]), b.const("ax0c", i64(0))])  # (1, T)
    queries = b.one("Unsqueeze", [b.one("Range", [b.one("Sub", [t, s]), t, one]), b.const("ax1", i64(1))])  # (S, 1)
    diff = b.one("Sub", [queries, keys])  # q - k, (S, T)

    def less(x, n: int):
        return b.one("Less", [x, b.const(f"n{n}", np.array(n, np.int64))])

    def either(a, c):
        return c if a is None else b.one("Or", [a, c])

    ok = None
    if pattern.window > 0:
        ok = either(ok, less(diff if causal else b.one("Abs", [diff]), pattern.window))
    if pattern.sinks:
        ok = either(ok, less(keys, pattern.sinks))
        if not causal:
            ok = either(ok, less(queries, pattern.sinks))
    if pattern.stride:
        ok = either(ok, b.one("Equal", [b.one("Mod", [diff, b.const("stride", np.array(pattern.stride, np.int64))]),
                                        zero]))
    if pattern.block:
        size = b.const("block", np.array(pattern.block, np.int64))
        qb, kb = b.one("Div", [queries, size]), b.one("Div", [keys, size])
        if pattern.local_blocks:
            gap = b.one("Sub", [qb, kb])
            ok = either(ok, less(gap if causal else b.one("Abs", [gap]), pattern.local_blocks))
        if pattern.global_blocks:
            ok = either(ok, less(kb, pattern.global_blocks))
            if not causal:
                ok = either(ok, less(qb, pattern.global_blocks))
        for name, table in (("random", pattern.random_table() if pattern.random_blocks else None),
                            ("layout", pattern.layout.astype(bool) if pattern.layout is not None else None)):
            if table is None:
                continue
            top = b.const(f"{name}_last", np.array(len(table) - 1, np.int64))
            rows = b.one("Gather", [b.const(f"{name}_table", table), b.one("Min", [qb, top])], axis=0)  # (S, 1, n)
            picked = b.one("GatherElements", [
                b.one("Squeeze", [rows, b.const(f"{name}_ax1", i64(1))]),
                b.one("Expand", [b.one("Min", [kb, top]), b.one("Shape", [diff])])], axis=1)  # (S, T)
            inside = b.one("And", [less_than(b, qb, len(table)), less_than(b, kb, len(table))])
            ok = either(ok, b.one("And", [picked, inside]))
    if np.dtype(dtype) in (np.float16, np.float32, np.float64):
        low = np.finfo(dtype).min
        return b.one("Where", [ok, b.const("allowed", np.array(0, dtype)), b.const("masked", np.array(low, dtype))])
    # bfloat16 and the like: ONNX Runtime's CPU Where has no kernel for them; build in float32
    low = np.float32(ml_dtypes.finfo(dtype).min)
    bias = b.one("Where", [ok, b.const("allowed", np.array(0, np.float32)), b.const("masked", np.array(low))])
    return b.one("Cast", [bias], to=ir.DataType.from_numpy(np.dtype(dtype)))


def less_than(b, x, n: int):
    return b.one("Less", [x, b.const(f"lt{n}", np.array(n, np.int64))])
