"""Loading and saving: hostile input refused, input never modified, atomic and deterministic output."""

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from sparsec import model_io
from sparsec.errors import InputError, OutputError
from sparsec.model_io import fingerprint, load_model, save_model, stage_model
from tests.helpers import FLOAT, file_hash, linear, make_model, run_ort, save, weights


def test_roundtrip_keeps_opsets_metadata_and_docs(tmp_path):
    proto = linear()
    proto.doc_string = "model doc"
    proto.graph.node[0].doc_string = "node doc"
    onnx.helper.set_model_props(proto, {"author": "me"})
    path = save(proto, tmp_path / "m.onnx")
    out = save_model(load_model(path).model, tmp_path / "o.onnx")
    back = onnx.load(str(out))
    assert back.doc_string == "model doc" and back.graph.node[0].doc_string == "node doc"
    assert {p.key: p.value for p in back.metadata_props} == {"author": "me"}
    assert [(o.domain, o.version) for o in back.opset_import] == [("", 17)]
    assert back.ir_version == 10


def test_external_data_is_lazy_and_written_beside_output(tmp_path):
    path = save(linear(k=64, n=64), tmp_path / "m.onnx", external=True)
    loaded = load_model(path)
    w = loaded.model.graph.initializers["W"].const_value
    assert isinstance(w, ir.ExternalTensor)
    assert loaded.external_files == [tmp_path / "m.onnx.data"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = save_model(loaded.model, out_dir / "o.onnx")
    assert (out_dir / "o.onnx.data").exists()
    x = weights(2, 64)
    np.testing.assert_array_equal(run_ort(out, {"X": x})[0], run_ort(path, {"X": x})[0])


def test_input_never_modified(tmp_path):
    path = save(linear(k=64, n=64), tmp_path / "m.onnx", external=True)
    before = file_hash(path, tmp_path / "m.onnx.data")
    loaded = load_model(path)
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    run_passes(loaded.model, parse_pass_specs("nm:min_params=0"), PassContext())
    save_model(loaded.model, tmp_path / "o.onnx", protect=(path,))
    assert file_hash(path, tmp_path / "m.onnx.data") == before


def test_output_over_input_refused(tmp_path):
    path = save(linear(), tmp_path / "m.onnx", external=True)
    loaded = load_model(path)
    with pytest.raises(OutputError, match="overwrite the input"):
        save_model(loaded.model, path, protect=(path,))
    # m.onnx.data is what m.onnx reads its weights from: writing "m.onnx" elsewhere is fine,
    # writing over the data file is not.
    with pytest.raises(OutputError, match="still reads"):
        save_model(loaded.model, tmp_path / "m.onnx")


def test_output_errors(tmp_path):
    model = load_model(save(linear(), tmp_path / "m.onnx")).model
    with pytest.raises(OutputError, match="is a directory"):
        save_model(model, tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        save_model(model, tmp_path / "nope" / "o.onnx")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("root ignores directory permissions")
        with pytest.raises(OutputError, match="not writable"):
            save_model(model, ro / "o.onnx")
    finally:
        ro.chmod(0o700)


def test_staged_model_is_complete_before_commit_and_discard_leaves_nothing(tmp_path):
    model = load_model(save(linear(), tmp_path / "m.onnx", external=True)).model
    staged = stage_model(model, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
    run_ort(staged.path, {"X": weights(1, 64)})
    staged.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_deterministic_bytes(tmp_path):
    path = save(linear(k=64, n=64), tmp_path / "m.onnx", external=True)
    a = save_model(load_model(path).model, tmp_path / "a.onnx")
    b = save_model(load_model(path).model, tmp_path / "b.onnx")
    assert a.read_bytes().replace(b"a.onnx.data", b"X.onnx.data") == b.read_bytes().replace(b"b.onnx.data", b"X.onnx.data")
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()


def test_fingerprint_tracks_content_not_metadata(tmp_path):
    m1 = load_model(save(linear(seed=0), tmp_path / "a.onnx")).model
    m2 = load_model(save(linear(seed=0), tmp_path / "b.onnx")).model
    m3 = load_model(save(linear(seed=1), tmp_path / "c.onnx")).model
    assert fingerprint(m1) == fingerprint(m2) != fingerprint(m3)
    next(iter(m2.graph)).metadata_props["sparsec.pass"] = "nm"
    assert fingerprint(m1) == fingerprint(m2)


def test_inline_decision_and_large_models_use_external_data(tmp_path, monkeypatch):
    model = load_model(save(linear(), tmp_path / "m.onnx")).model
    save_model(model, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()
    monkeypatch.setattr(model_io, "INLINE_LIMIT_BYTES", 1024)  # stands in for protobuf's 2 GB
    save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    with pytest.raises(OutputError, match="need external data"):
        save_model(model, tmp_path / "big2.onnx", external_data=False)


# --- hostile input ----------------------------------------------------------------------

def test_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model\n")
    with pytest.raises(InputError, match="not an ONNX model"):
        load_model(bad)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        load_model(tmp_path / "empty.onnx")
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="is a directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.99])
def test_truncated_protobuf(tmp_path, fraction):
    data = save(linear(), tmp_path / "m.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputError):
        load_model(cut)


def _external_model(tmp_path, location="m.onnx.data"):
    proto = linear()
    onnx.save(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, str(tmp_path / "m.onnx"))
    return tmp_path / "m.onnx"


def test_missing_external_data(tmp_path):
    path = _external_model(tmp_path)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(InputError, match="is missing"):
        load_model(path)


def test_truncated_external_data(tmp_path):
    path = _external_model(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputError, match="truncated"):
        load_model(path)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin", "C:\\x.bin"])
def test_external_data_outside_directory_refused(tmp_path, location):
    path = _external_model(tmp_path, location)
    with pytest.raises(InputError, match="outside the model directory|refused"):
        load_model(path)


def test_external_data_symlink_and_hardlink_refused(tmp_path):
    path = _external_model(tmp_path)
    data = tmp_path / "m.onnx.data"
    real = tmp_path / "real.data"
    data.rename(real)
    data.symlink_to(real)
    with pytest.raises(InputError, match="symbolic link"):
        load_model(path)
    data.unlink()
    os.link(real, data)
    with pytest.raises(InputError, match="hard links"):
        load_model(path)


def test_unsupported_opsets(tmp_path):
    future = linear()
    future.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    with pytest.raises(InputError, match="newer than this ONNX build"):
        load_model(save(future, tmp_path / "f.onnx"))
    old = linear()  # as old exporters wrote them: IR 3, every weight also a graph input
    old.opset_import[0].version = 6
    old.ir_version = 3
    old.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [64, 32]))
    loaded = load_model(save(old, tmp_path / "o.onnx"))
    assert "opset 6 upgraded to opset 7 with onnx.version_converter" in loaded.notes[0]
    assert loaded.runnable != loaded.path and loaded.model.opset_imports[""] == 7
    run_ort(loaded.runnable, {"X": weights(2, 64)})  # ONNX Runtime runs the upgraded reference
    broken = linear()
    broken.opset_import[0].version = 6
    broken.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [64, 32]))
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InputError, match="opset 6 is older than ONNX Runtime runs .7. and onnx.version_converter"
                                         " cannot upgrade it"):
        load_model(save(broken, tmp_path / "b.onnx"))


def test_initializers_listed_as_inputs_become_constants_on_request(tmp_path):
    proto = linear()
    proto.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [64, 32]))
    path = save(proto, tmp_path / "m.onnx")
    assert [v.name for v in load_model(path).model.graph.inputs] == ["X", "W"]
    loaded = load_model(path, constant_initializers=True)
    assert [v.name for v in loaded.model.graph.inputs] == ["X"] and "--constant-initializers" in loaded.notes[0]


def test_transposed_constant_weights_are_folded(tmp_path):
    w = weights(32, 64)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["X", "Wt"], ["Y"])]
    proto = make_model(nodes, [("X", FLOAT, [2, 64])], [("Y", FLOAT, [2, 32])], initializers={"W": w})
    path = save(proto, tmp_path / "t.onnx")
    loaded = load_model(path)
    assert [n.op_type for n in loaded.model.graph] == ["MatMul"] and any("Transpose" in n for n in loaded.notes)
    np.testing.assert_array_equal(loaded.model.graph.node(0).inputs[1].const_value.numpy(), w.T)
    x = weights(2, 64)
    np.testing.assert_array_equal(run_ort(save_model(loaded.model, tmp_path / "o.onnx"), {"X": x})[0],
                                  run_ort(path, {"X": x})[0])


def test_sparse_initializer_is_densified_exactly(tmp_path):
    w = weights(64, 32)
    w[np.abs(w) < 1.0] = 0
    proto = linear()
    del proto.graph.initializer[:]
    idx = np.flatnonzero(w)
    sparse = helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(w.ravel()[idx], "W"), onnx.numpy_helper.from_array(idx.astype(np.int64), "W_idx"), [64, 32])
    proto.graph.sparse_initializer.append(sparse)
    path = save(proto, tmp_path / "s.onnx")
    loaded = load_model(path)
    assert any("sparse_initializer" in n for n in loaded.notes)
    np.testing.assert_array_equal(loaded.model.graph.initializers["W"].const_value.numpy(), w)
    out = save_model(loaded.model, tmp_path / "o.onnx")
    x = weights(2, 64)
    np.testing.assert_array_equal(run_ort(out, {"X": x})[0], run_ort(path, {"X": x})[0])


def test_unsorted_graph_is_sorted(tmp_path):
    proto = linear()
    proto.graph.node.reverse()
    loaded = load_model(save(proto, tmp_path / "u.onnx"))
    assert any("topologically sorted" in n for n in loaded.notes)
    assert [n.op_type for n in loaded.model.graph] == ["MatMul", "Relu"]
    out = save_model(loaded.model, tmp_path / "o.onnx")
    onnx.checker.check_model(str(out), full_check=True)


def test_dangling_input_is_reported(tmp_path):
    nodes = [helper.make_node("Relu", ["nowhere"], ["Y"], name="r")]
    proto = make_model(nodes, [("X", FLOAT, [2])], [("Y", FLOAT, [2])])
    with pytest.raises(InputError, match="nothing produces"):
        load_model(save(proto, tmp_path / "d.onnx"))


def test_python_api_raises_typed_errors(tmp_path):
    """Hostile input through the Python API: SparsecError subclasses, nothing written."""
    import sparsec
    from sparsec.errors import SparsecError

    (tmp_path / "bad.onnx").write_text("not a model")
    good = save(linear(), tmp_path / "m.onnx", external=True)
    cases = [
        lambda: sparsec.compile(tmp_path / "bad.onnx", output=tmp_path / "o.onnx"),
        lambda: sparsec.compile(good, target="tpu", output=tmp_path / "o.onnx"),
        lambda: sparsec.compile(good, passes="nm:n=9", output=tmp_path / "o.onnx"),
        lambda: sparsec.compile(good, output=good),
        lambda: sparsec.compile(12, output=tmp_path / "o.onnx"),
    ]
    for case in cases:
        with pytest.raises(SparsecError):
            case()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "m.onnx", "m.onnx.data"]
