"""compile end to end on the example models, through the Python API."""

import json

import numpy as np
import onnx
import pytest

from sparsec.compiler import compile
from sparsec.errors import VerificationError
from sparsec.model_io import load_model
from sparsec.passes.patterns import LINEAR_OPS, Code, match_linear_weight
from sparsec.runtime import staged
from sparsec.runtime.session import Runner
from sparsec.sparsity import is_nm
from sparsec.feeds import input_specs, random_feeds
from sparsec.models.llama import _tiny_inputs
from sparsec.verify import verify_models
from tests.helpers import perplexity


def pruned_weights(path):
    """(weight array, reduce axis) of every node the nm pass tagged."""
    model = load_model(path).model
    out = []
    for node in model.graph:
        if node.op_type in LINEAR_OPS and node.metadata_props.get("sparsec.pass") == "nm":
            site = match_linear_weight(node)
            out.append((site.weight.numpy(), site.reduce_axis))
    return out


def test_minilm_ampere_every_pruned_weight_is_2_4(zoo_path, tmp_path):
    src = zoo_path("minilm")
    result = compile(src, target="ampere", output=tmp_path / "minilm.sparse.onnx", best_effort=True)
    out = result.output
    onnx.checker.check_model(str(out), full_check=True)
    weights = pruned_weights(out)
    assert len(weights) == 36  # q, k, v, attention output, FFN in and out in 6 layers
    for w, axis in weights:
        assert is_nm(w, 2, 4, axis) and np.count_nonzero(w) == w.size // 2
    real = result.verdicts["real"]
    assert real.metrics["sentences"] == 64
    assert 0 < real.metrics["embedding_cosine_mean"] < 1
    report = json.loads(result.report_path.read_text())
    assert report["verification"]["real"]["metrics"]["embedding_cosine_mean"] == real.metrics["embedding_cosine_mean"]
    assert report["sparsity_after"]["nm_compliant"]["2:4"] == 36

    # Pruning the already-2:4 model again changes nothing and verifies exactly.
    again = compile(out, target="ampere", output=tmp_path / "again.onnx", best_effort=True)
    assert again.records[0].skip_counts()["ALREADY_SPARSE"] == 36 and not again.records[0].changed
    feeds = random_feeds(input_specs(load_model(out).model), samples=2)
    verdict = verify_models(out, again.output, feeds)
    assert verdict.passed and all(o.max_abs == 0 for o in verdict.outputs)
    assert (tmp_path / "again.onnx.data").read_bytes() == (tmp_path / "minilm.sparse.onnx.data").read_bytes()


def test_tiny_llama_real_text_perplexity_and_verify_each(zoo_path, tmp_path):
    result = compile(zoo_path("tiny-llama"), passes="nm:min_params=0", output=tmp_path / "o.onnx", best_effort=True,
                     verify_each=True)
    record = result.records[0]
    assert len(record.changed) == 14  # 7 projections x 2 layers; lm_head is tied (NOT_CONSTANT)
    assert record.fidelity is not None and record.fidelity["exact"] is False
    metrics = result.verdicts["real"].metrics
    assert metrics["tokens"] == 4 * 127
    windows = _tiny_inputs(4)
    assert metrics["perplexity_candidate"] == pytest.approx(perplexity(result.output, windows), rel=1e-5)
    assert metrics["perplexity_reference"] == pytest.approx(perplexity(zoo_path("tiny-llama"), windows), rel=1e-5)


def test_cnn_conv_layouts(zoo_path, tmp_path):
    result = compile(zoo_path("cnn"), passes="nm:min_params=0", output=tmp_path / "cnn.onnx", best_effort=True)
    record = result.records[0]
    by_code = record.skip_counts()
    # First conv (3 input channels) and the depthwise conv (1 per group) cannot be 2:4.
    assert by_code[Code.NOT_DIVISIBLE] == 2
    assert len(record.changed) == 3  # dense 3x3, 1x1, grouped (16 channels per group)
    for w, axis in pruned_weights(result.output):
        assert axis == 1 and is_nm(w, 2, 4, 1)
    assert "real" not in result.verdicts  # no real images offline: random inputs only


def test_exact_plan_must_match(zoo_path, tmp_path, monkeypatch):
    """An exact plan whose output differs fails verification and writes nothing."""
    from sparsec import compiler

    monkeypatch.setattr(compiler.Plan, "exact", property(lambda self: True))
    with pytest.raises(VerificationError, match="exact rewrite changed the outputs"):
        compile(zoo_path("tiny-bert"), passes="nm:min_params=0", output=tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_streamed_path_matches_in_memory_path(zoo_path, tmp_path, monkeypatch):
    """Models over STREAM_BYTES spill rewritten weights and verify in stages; the bytes written
    and the fidelity are those of the in-memory path."""
    from sparsec import compiler

    src = zoo_path("tiny-bert")
    (tmp_path / "a").mkdir()
    normal = compile(src, passes="nm:min_params=0;compress", output=tmp_path / "a" / "m.onnx", best_effort=True)
    monkeypatch.setattr(compiler, "STREAM_BYTES", 0)
    monkeypatch.setattr("sparsec.graph.SPILL_MIN_BYTES", 1)
    opened = []  # what each ONNX Runtime session was made from: a stage's bytes, or a whole model's path
    session = Runner.session
    monkeypatch.setattr(Runner, "session", lambda self, model, **kw: opened.append(model) or session(self, model, **kw))
    runs = []  # models run whole in stages
    staged_outputs = staged.staged_outputs
    monkeypatch.setattr(staged, "staged_outputs", lambda model, *a, **kw: runs.append(model) or staged_outputs(model, *a, **kw))
    (tmp_path / "b").mkdir()
    streamed = compile(src, passes="nm:min_params=0;compress", output=tmp_path / "b" / "m.onnx", best_effort=True)
    assert any("compiled streamed" in n for n in streamed.notes)
    # never a session of a whole model (it would copy every weight): the input check runs in stages too
    assert opened and all(isinstance(m, bytes) for m in opened), [m for m in opened if not isinstance(m, bytes)]
    # on generated inputs the original runs once (checking them; its outputs are reused), the output
    # once; on real inputs, both once
    assert len(runs) == 2 + 2 * ("real" in streamed.verdicts), runs
    assert "run in stages" in streamed.verdicts["random"].inputs
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert streamed.verdicts["random"].min_cosine == pytest.approx(normal.verdicts["random"].min_cosine, abs=1e-5)
    assert [p.name for p in (tmp_path / "b").iterdir() if p.name.endswith(".sparsec-tmp")] == []


def test_streamed_sparsegpt_with_parallel_solves_matches_the_in_memory_sequential_path(zoo_path, tmp_path,
                                                                                      monkeypatch):
    """SparseGPT streamed (stages captured one at a time, pruned weights spilled to disk) with a
    stage's solves in threads writes the bytes of the in-memory compile that solves one by one."""
    from sparsec import compiler

    src = zoo_path("tiny-llama")
    spec = "nm:min_params=0,method=sparsegpt"
    results = []
    for name, jobs, limit in (("a", 1, compiler.STREAM_BYTES), ("b", 3, 0)):
        monkeypatch.setattr(compiler, "STREAM_BYTES", limit)
        monkeypatch.setattr("sparsec.graph.SPILL_MIN_BYTES", 1 if limit == 0 else 1 << 20)
        (tmp_path / name).mkdir()
        results.append(compile(src, passes=spec, calib="builtin", calib_samples=4, calib_seqlen=32, jobs=jobs,
                               output=tmp_path / name / "m.onnx", best_effort=True))
    normal, streamed = results
    assert any("compiled streamed" in n for n in streamed.notes)
    assert not any("compiled streamed" in n for n in normal.notes)
    assert len(streamed.records[0].changed) >= 4 and "sparsegpt" in streamed.records[0].notes[0]
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_compiles_sharing_a_references_folder_run_the_original_once(zoo_path, tmp_path, monkeypatch):
    """A sweep's candidates: the first compile runs the original on the verification inputs and
    keeps its outputs, the others read them; the verdicts are those of compiles that run it."""
    src = zoo_path("minilm")
    specs = ["ffn-neurons:ratio=0.25", "attention-heads:ratio=0.25"]
    options = {"best_effort": True, "samples": 1, "calib_samples": 32}
    alone = compile(src, passes=specs[1], output=tmp_path / "alone.onnx", **options)
    opened = []
    session = Runner.session

    def spy(self, model, **kw):
        opened.append(str(model))
        return session(self, model, **kw)

    monkeypatch.setattr(Runner, "session", spy)
    counts, shared = [], []
    for i, spec in enumerate(specs):
        before = len(opened)
        shared.append(compile(src, passes=spec, output=tmp_path / f"s{i}.onnx", shared_references=tmp_path / "refs",
                              **options))
        counts.append(sum(p == str(src) for p in opened[before:]))
    # the first: the random inputs' check and the real inputs; the second: only the check
    assert counts == [2, 1]
    verdicts = [{k: v.to_dict() for k, v in r.verdicts.items()} for r in (alone, shared[1])]
    assert verdicts[0] == verdicts[1] and verdicts[0]["real"]["input_sets"] > 1
    assert shared[1].verdicts["real"].metrics["embedding_cosine_mean"] < 1  # a lossy change, compared
