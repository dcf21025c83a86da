"""A reference decode loop for KV-cache exports: greedy, one token at a time, copyable.

It works on the exports as they come (``input_ids``, ``attention_mask``, ``past_key_values.{i}.key
/value`` in (batch, kv_heads, positions, head_dim), ``logits`` and ``present.{i}.key/value`` out;
an optional ``position_ids``) and on what the ``attention`` pass makes of them:

* fused into GroupQueryAttention, the interface is unchanged: the cache grows by the new tokens
  each step, the mask covers every token so far;
* with a bounded cache (``cache=window``; the model's metadata ``sparsec.kv_cache_capacity`` is
  the window W), ``present`` is a buffer of max(W, past) positions holding the most recent keys,
  fed back as the next ``past`` unchanged, so memory stays at W positions whatever the context.
  The first step passes W positions of zeros. ``attention_mask`` still covers every token (it
  carries the absolute position; a (1, T) int64 costs 8 bytes a token). On the CUDA provider the
  kernel wants past and present in one buffer: bind both to the same OrtValue with IOBinding
  (``sparsec.runtime.bench`` does);
* lowered to SparseAttention (``lowering=sparse``; metadata ``sparsec.kv_shared_buffer``), past
  and present are always one buffer of C positions (C >= every token so far, zeros beyond them;
  the heads zero-padded to 128 as :func:`sparsec.runtime.kvcache.pad_heads` lays them out),
  bound with IOBinding on every provider. This loop grows C by doubling when it runs out.

    from sparsec.runtime.decode import Decoder
    decoder = Decoder("smollm2-window.onnx")
    logits = decoder.prompt(ids)          # (1, S, vocab) for the prompt
    for _ in range(32):
        logits = decoder.step(int(logits[0, -1].argmax()))
"""

from __future__ import annotations

import os

import numpy as np

from sparsec.errors import InputError
from sparsec.runtime.kvcache import KVCache, present_of
from sparsec.verify import MAX_POSITIONS_KEY


class Decoder:
    """Greedy decoding state for one sequence (batch 1) of a KV-cache decoder."""

    def __init__(self, model: str | os.PathLike, *, runner=None, session=None) -> None:
        from sparsec.runtime.session import cpu_runner

        self.runner = runner or cpu_runner()
        self.session = session or self.runner.session(model)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.kv = KVCache.of(meta)
        self.capacity = self.kv.window
        self.max_positions = int(meta[MAX_POSITIONS_KEY]) if MAX_POSITIONS_KEY in meta else None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        if "input_ids" not in inputs or not self.past_names:
            raise InputError("the decode loop needs a KV-cache export: input_ids and past_key_values.* inputs"
                             f" (this model has {', '.join(inputs)})")
        self.present_names = [present_of(n) for n in self.past_names]
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.present_names + ["logits"] if n not in outputs]
        if missing:
            raise InputError(f"the model has no output '{missing[0]}' for its input '{self.past_names[0]}'")
        self.has_mask = "attention_mask" in inputs
        self.has_positions = "position_ids" in inputs
        self.dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        shape = inputs[self.past_names[0]].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.reset()

    def reset(self) -> None:
        """Forget the sequence: an empty cache."""
        empty = np.zeros((1, self.kv_heads, self.capacity or 0, self.head_dim), self.dtype)
        self.past = {n: empty for n in self.past_names}
        self.length = 0  # tokens seen so far

    @property
    def cache_bytes(self) -> int:
        """Bytes the KV cache holds now (every layer, keys and values)."""
        return sum(v.nbytes for v in self.past.values())

    def _run(self, ids: np.ndarray) -> np.ndarray:
        new = ids.shape[1]
        if self.max_positions is not None and self.length + new > self.max_positions:
            raise InputError(f"the sequence would reach {self.length + new} tokens; this model's rotary tables end at"
                             f" {self.max_positions} (compile with attention:max_positions=N for longer contexts)")
        shared = {}
        if self.kv.shared is not None:  # one buffer of C >= every position, grown by doubling
            need, have = self.length + new, next(iter(self.past.values())).shape[2]
            if need > have:
                self.past = {n: self.kv.buffer(v, min(max(need, 2 * have, 256), self.kv.shared))
                             for n, v in self.past.items()}
            shared = dict(zip(self.past_names, self.present_names))
        feed = {"input_ids": ids.astype(np.int64), **self.past}
        if self.has_mask:
            feed["attention_mask"] = np.ones((1, self.length + new), np.int64)
        if self.has_positions:
            feed["position_ids"] = np.arange(self.length, self.length + new, dtype=np.int64)[None]
        outputs = self.runner.run(self.session, feed, ["logits", *self.present_names], shared=shared)
        self.past = {p: outputs[q] for p, q in zip(self.past_names, self.present_names)}
        self.length += new
        return outputs["logits"]

    def prompt(self, ids) -> np.ndarray:
        """Run the prompt (token ids, 1-D or (1, S)); return its logits (1, S, vocab)."""
        self.reset()
        return self._run(np.asarray(ids, np.int64).reshape(1, -1))

    def step(self, token: int) -> np.ndarray:
        """Feed one token; return its logits (1, 1, vocab)."""
        return self._run(np.array([[token]], np.int64))

    def generate(self, ids, steps: int) -> list[int]:
        """Greedy continuation of ``ids`` by ``steps`` tokens."""
        logits = self.prompt(ids)
        out = []
        for _ in range(steps):
            out.append(int(logits[0, -1].argmax()))
            logits = self.step(out[-1])
        return out
