"""Outputs: every destination checked before work; reports, recipe and model written all or none."""

import pytest

from sparsec.errors import OptionError, OutputError
from sparsec.model_io import stage_model
from sparsec.outputs import Outputs, check_reports, write_text_atomic
from tests.helpers import linear


def test_report_and_recipe_destinations_are_checked_first(tmp_path):
    assert check_reports([tmp_path / "r.json", tmp_path / "r.md"]) == [tmp_path / "r.json", tmp_path / "r.md"]
    with pytest.raises(OptionError, match="unknown format '.pdf'"):
        check_reports([tmp_path / "r.pdf"])
    with pytest.raises(OutputError, match="does not exist"):
        check_reports([tmp_path / "nodir" / "r.json"])
    (tmp_path / "d.json").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        check_reports([tmp_path / "d.json"])
    with pytest.raises(OptionError, match="use a .yaml, .yml or .json"):
        Outputs(recipe=tmp_path / "r.txt").check()
    with pytest.raises(OutputError, match="does not exist"):
        Outputs(recipe=tmp_path / "nodir" / "r.yaml").check()


def test_commit_writes_everything_or_nothing(tmp_path):
    import onnx_ir as ir

    model = ir.serde.deserialize_model(linear())
    staged = stage_model(model, tmp_path / "out.onnx")
    texts = {tmp_path / "a.json": "{}\n", tmp_path / "gone" / "b.md": "# b\n"}
    with pytest.raises(OutputError, match="cannot write"):
        Outputs(tmp_path / "out.onnx").commit(texts, staged)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no model, no report, no temporary
    staged = stage_model(model, tmp_path / "out.onnx")
    Outputs(tmp_path / "out.onnx").commit({tmp_path / "a.json": "{}\n"}, staged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "out.onnx"]


def test_write_text_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "r.md"
    write_text_atomic(path, "one\n")
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n" and [p.name for p in tmp_path.iterdir()] == ["r.md"]
