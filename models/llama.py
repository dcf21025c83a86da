"""LLaMA-architecture decoders: a tiny random one for CI (SmolLM2-135M joins in the pruning work).

The export takes ``input_ids`` (batch, sequence) and returns ``logits``; attention is causal and
positions implicit. Real inputs are token windows of the held-out half of
``pydoc_data.topics``; the task metric is next-token perplexity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparsec.metrics import Perplexity

from . import text
from .zoo import ZooModel, export_torch, register


def _decoder_module(model):
    """Wrap a causal LM so the export has one input and returns only the logits."""
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.m = inner

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    return Decoder(model)


def export_decoder(model, path: Path, zoo_name: str) -> None:
    import torch

    ids = torch.arange(2 * 16, dtype=torch.int64).reshape(2, 16) % model.config.vocab_size
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=8192)
    export_torch(_decoder_module(model), (ids,), path, zoo_name=zoo_name, input_names=["input_ids"],
                 output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}})


def token_windows(token_ids: list[int], count: int, length: int) -> list[dict[str, np.ndarray]]:
    """``count`` consecutive, non-overlapping windows of ``length`` tokens, one input set each."""
    need = count * length
    if len(token_ids) < need:
        raise ValueError(f"text has {len(token_ids)} tokens, {need} needed")
    ids = np.asarray(token_ids[:need], dtype=np.int64).reshape(count, 1, length)
    return [{"input_ids": window} for window in ids]


def _tiny_inputs(count: int, length: int = 128) -> list[dict[str, np.ndarray]]:
    from .bert import tokenizer

    ids = tokenizer()(text.text("evaluation"), add_special_tokens=False)["input_ids"]
    return token_windows(ids, count, length)


def _build_tiny_llama(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .bert import tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer().vocab_size, hidden_size=64, intermediate_size=192,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
    )
    export_decoder(LlamaForCausalLM(config), path, "tiny-llama")


TINY_LLAMA = register(ZooModel(
    name="tiny-llama",
    description="tiny LLaMA decoder, random weights (2 layers, hidden 64, SwiGLU FFN 192,"
    " 4 query heads on 2 KV heads, tied embeddings)",
    kind="decoder", real_weights=False, version=1, builder=_build_tiny_llama,
    real_inputs=_tiny_inputs, metrics=lambda: [Perplexity()],
    inputs_note="128-token windows of held-out pydoc_data.topics text (second half), MiniLM tokenizer",
))
