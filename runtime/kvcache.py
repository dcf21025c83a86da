"""How a compiled model's KV cache is fed and read back: one place for every runner (verify, bench,
the decode loop).

The ``attention`` pass leaves three interfaces, told apart by the model's metadata:

* as exported -- ``past_key_values.{i}.key/value`` (batch, kv_heads, past, head) in, ``present.*``
  (batch, kv_heads, past + new, head) out;
* bounded (``sparsec.kv_cache_capacity`` = W; GroupQueryAttention's sliding_window_cache) -- a
  buffer of max(W, past) positions holding the most recent keys, zeros while not yet full;
* shared (``sparsec.kv_shared_buffer`` = the most positions its layout covers; SparseAttention) --
  one buffer of fixed capacity C >= every position so far that the kernel writes in place: past
  and present must be the same memory (IOBinding), the positions from 0, the rest zeros. Its
  heads may be zero-padded (``sparsec.kv_head_padding`` = "64:128"): each half of a head in the
  first half of each half of the buffer's head, ``[x0..x31, 0 x 32, x32..x63, 0 x 32]``, so that
  a rotate-half rotary embedding pairs the same elements (:func:`pad_heads`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

KV_CAPACITY_KEY = "sparsec.kv_cache_capacity"  # metadata of a model whose KV cache is bounded
KV_SHARED_KEY = "sparsec.kv_shared_buffer"  # metadata: past and present are one buffer (its most positions)
KV_HEAD_PADDING_KEY = "sparsec.kv_head_padding"  # metadata: "model:buffer" head sizes of a padded cache


def pad_heads(x: np.ndarray, size: int) -> np.ndarray:
    """(..., head) -> (..., size): each half of the head zero-filled to size / 2."""
    head = x.shape[-1]
    if head == size:
        return x
    halves = x.reshape(x.shape[:-1] + (2, head // 2))
    pad = np.zeros(x.shape[:-1] + (2, (size - head) // 2), x.dtype)
    return np.concatenate([halves, pad], axis=-1).reshape(x.shape[:-1] + (size,))


def unpad_heads(x: np.ndarray, head: int) -> np.ndarray:
    """The inverse of :func:`pad_heads`."""
    size = x.shape[-1]
    if head == size:
        return x
    return x.reshape(x.shape[:-1] + (2, size // 2))[..., : head // 2].reshape(x.shape[:-1] + (head,))


def is_past(name: str) -> bool:
    from sparsec.feeds import is_kv_cache_name

    return is_kv_cache_name(name) and "present" not in name.lower()


def present_of(name: str) -> str:
    """``past_key_values.3.key`` -> ``present.3.key`` (the exports' naming)."""
    return name.replace("past_key_values", "present", 1)


@dataclass(frozen=True)
class KVCache:
    """The KV-cache interface of one model, from its metadata."""

    window: int | None = None  # bounded: the buffer holds the last W positions
    shared: int | None = None  # one buffer of up to this many positions, written in place
    head: tuple[int, int] | None = None  # (the model's head size, the buffer's) when padded

    @classmethod
    def of(cls, metadata: Mapping[str, str]) -> KVCache:
        window = int(metadata[KV_CAPACITY_KEY]) if KV_CAPACITY_KEY in metadata else None
        shared = int(metadata[KV_SHARED_KEY]) if KV_SHARED_KEY in metadata else None
        head = tuple(int(v) for v in metadata[KV_HEAD_PADDING_KEY].split(":")) \
            if KV_HEAD_PADDING_KEY in metadata else None
        return cls(window, shared, head)  # type: ignore[arg-type]

    @classmethod
    def of_session(cls, session) -> KVCache:
        return cls.of(session.get_modelmeta().custom_metadata_map)

    @property
    def plain(self) -> bool:
        return self.window is None and self.shared is None

    def buffer(self, past: np.ndarray, positions: int) -> np.ndarray:
        """The buffer this model takes for an exported ``past`` (batch, kv_heads, P, head): heads
        padded, positions zero-filled up to ``positions``."""
        if self.head is not None:
            past = pad_heads(past, self.head[1])
        if past.shape[2] < positions:
            fill = np.zeros(past.shape[:2] + (positions - past.shape[2],) + past.shape[3:], past.dtype)
            past = np.concatenate([past, fill], axis=2)
        return past

    def feed(self, feed: Mapping[str, Any], inputs: list | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        """(the input this model takes for an exported model's ``feed``, {past input: present
        output} that must share a buffer). ``inputs``: the session's inputs (``get_inputs()``),
        for shared buffers the feed lacks (a prompt-only export): zeros."""
        feed = dict(feed)
        if self.plain:
            return feed, {}
        if self.window is not None:
            for name, value in list(feed.items()):
                if is_past(name) and isinstance(value, np.ndarray) and value.ndim == 4:
                    feed[name] = self.buffer(value, self.window)
            return feed, {}
        total = self.total(feed)
        for spec in inputs or ():
            if is_past(spec.name) and spec.name not in feed:
                batch = self._batch(feed)
                dtype = np.float16 if "float16" in spec.type else np.float32
                feed[spec.name] = np.zeros((batch, int(spec.shape[1]), 0, self.head[0] if self.head else
                                            int(spec.shape[3])), dtype)
        shared = {}
        for name, value in list(feed.items()):
            if is_past(name) and isinstance(value, np.ndarray) and value.ndim == 4:
                feed[name] = self.buffer(value, total)
                shared[name] = present_of(name)
        return feed, shared

    @staticmethod
    def _batch(feed: Mapping[str, Any]) -> int:
        ids = feed.get("input_ids")
        if ids is None:
            ids = next(v for v in feed.values() if isinstance(v, np.ndarray) and v.ndim >= 2)
        return int(ids.shape[0])

    @staticmethod
    def total(feed: Mapping[str, Any]) -> int:
        """Every position after this step: the mask's width, else past + new tokens."""
        mask = feed.get("attention_mask")
        if isinstance(mask, np.ndarray) and mask.ndim == 2:
            return int(mask.shape[1])
        past = next((v.shape[2] for n, v in feed.items() if is_past(n) and isinstance(v, np.ndarray)
                     and v.ndim == 4), 0)
        ids = feed.get("input_ids")
        return past + (int(ids.shape[1]) if isinstance(ids, np.ndarray) and ids.ndim == 2 else 0)

    def view(self, ref: Mapping[str, Any], cand: Mapping[str, Any],
             total: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(reference, candidate) outputs as this model must match an exported one's: its KV
        outputs (batch, heads, positions, head) hold the reference's last positions (bounded: the
        rest of the buffer undefined while not full) or the first ``total`` (shared: heads
        unpadded). Other outputs as they are."""
        ref, cand = dict(ref), dict(cand)
        if self.plain:
            return ref, cand
        for name, r in list(ref.items()):
            c = cand.get(name)
            if not (is_past(name) or "present" in name.lower()) or not isinstance(r, np.ndarray) \
                    or not isinstance(c, np.ndarray) or r.ndim != 4 or c.ndim != 4:
                continue
            if self.head is not None:
                c = unpad_heads(c, self.head[0])
            if r.shape[:2] + r.shape[3:] != c.shape[:2] + c.shape[3:]:
                continue
            if self.shared is not None:
                cand[name] = c[:, :, : total if total is not None else r.shape[2]]
                continue
            held = min(r.shape[2], c.shape[2])
            ref[name], cand[name] = r[:, :, r.shape[2] - held:], c[:, :, :held] if r.shape[2] < c.shape[2] else c
        return ref, cand
