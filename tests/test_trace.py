"""sparsec match: per candidate, MATCH or the failed check with its code, message and node."""

import json

import onnx_ir as ir
from onnx import helper

from sparsec.cli import main
from sparsec.passes.patterns import Code
from sparsec.trace import trace
from tests.helpers import FLOAT, linear


def test_trace_reports_matches_and_failures_with_their_meaning():
    proto = linear(k=64, n=32)
    result = trace(ir.serde.deserialize_model(proto), "nm:min_params=0")
    assert [(r.status, r.node) for r in result.rows] == [("MATCH", "lin")] and result.matched == 1
    proto.graph.input.append(helper.make_tensor_value_info("W", FLOAT, [64, 32]))
    (row,) = trace(ir.serde.deserialize_model(proto), "nm:min_params=0").rows
    assert row.status == Code.GRAPH_INPUT and "override it at run time" in row.message
    assert row.meaning == Code.GRAPH_INPUT.meaning and "GRAPH_INPUT" in row.line()


def test_match_command_on_minilm(zoo_path, capsys):
    assert main(["match", str(zoo_path("minilm")), "--pass", "ffn-neurons"]) == 0
    out = capsys.readouterr().out
    assert "ffn-neurons: 48 candidate(s): MATCH 6, NOT_A_REGION 42" in out
    assert out.count("MATCH  ") == 6 and "m.encoder.layer.0.output.dense" in out
    assert main(["match", str(zoo_path("minilm")), "--pass", "nm", "--node", "*layer.5*", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["matched"] == 6 and all("layer.5" in r["site"] for r in data["rows"])
    assert {r["status"] for r in data["rows"]} == {"MATCH", "NOT_CONSTANT"}  # Q.K^T and P.V read no weight


def test_match_command_on_the_ort_optimized_minilm(zoo_path, capsys):
    path = str(zoo_path("minilm-ort"))
    assert main(["match", path, "--pass", "ffn-neurons", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["MATCH"] == 6  # BiasGelu FFNs
    assert main(["match", path, "--pass", "attention-heads", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out)["rows"] if r["status"] == "ESCAPES"]
    # ORT shares shape subgraphs between layers: removing heads would change another layer's shapes.
    assert len(rows) == 6 and all("read outside the attention" in r["message"] and r["at"] for r in rows)


def test_match_takes_one_pass(tmp_path, capsys):
    from tests.helpers import save

    path = save(linear(), tmp_path / "m.onnx")
    assert main(["match", str(path), "--pass", "nm;compress"]) == 2
    assert "--pass takes one pass spec, got 2" in capsys.readouterr().err
