"""Non-uniform sparsity (OWL) and per-layer sensitivity."""

import json

import numpy as np
import pytest

from sparsec.cli import main
from sparsec.passes.allocation import layer_of, outlier_ratio, owl_sparsities


def test_layer_names():
    assert layer_of("model.layers.12.mlp.down_proj") == "model.layers.12"
    assert layer_of("m.encoder.layer.3.attention.self.query") == "m.encoder.layer.3"
    assert layer_of("lm_head") == "lm_head"


def test_owl_keeps_the_mean_and_bounds():
    ratios = {"a": 0.01, "b": 0.03, "c": 0.02, "d": 0.05}
    s = owl_sparsities(ratios, target=0.5, lam=0.08)
    assert np.mean(list(s.values())) == pytest.approx(0.5)
    assert max(s.values()) - min(s.values()) == pytest.approx(0.16)
    assert s["d"] < s["b"] < s["c"] < s["a"]  # more outliers, fewer zeros
    assert owl_sparsities({"a": 0.1, "b": 0.1}, 0.6, 0.08) == {"a": pytest.approx(0.6), "b": pytest.approx(0.6)}
    assert outlier_ratio([np.array([1.0, 1, 1, 100])], m=2) == 0.25


def test_owl_pass_on_tiny_llama(zoo_path, tmp_path):
    from sparsec.compiler import compile

    result = compile(zoo_path("tiny-llama"), passes="unstructured:sparsity=0.5,allocation=owl,min_params=0", best_effort=True,
                     output=tmp_path / "o.onnx", calib_samples=8, calib_seqlen=64)
    record = result.records[0]
    layers = record.extra["allocation"]["layers"]
    assert len(layers) == 2 and np.mean([v["sparsity"] for v in layers.values()]) == pytest.approx(0.5)
    sparsities = {round(s.sparsity_after, 3) for s in record.changed}
    assert len(sparsities) == 2  # one per layer
    assert result.report()["records"][0]["allocation"]["method"] == "owl"
    assert record.sparsity() == pytest.approx(0.5, abs=0.01)


def test_analyze_command(zoo_path, capsys):
    code = main(["analyze", str(zoo_path("tiny-llama")), "--calib-samples", "4", "--calib-seqlen", "32",
                 "--levels", "0.5,0.9", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and len(data["layers"]) == 2
    for layer in data["layers"]:
        assert 0 <= layer["drop"]["0.5"] < layer["drop"]["0.9"]
    assert set(data["allocation"]["layers"]) == {l["layer"] for l in data["layers"]}
    assert main(["analyze", str(zoo_path("tiny-llama")), "--levels", "1.5"]) == 2


def test_analyze_html_report(zoo_path, tmp_path, capsys):
    from tests.test_report import parse

    code = main(["analyze", str(zoo_path("tiny-llama")), "--calib-samples", "4", "--calib-seqlen", "32",
                 "--report", str(tmp_path / "a.html"), "--report", str(tmp_path / "a.md")])
    assert code == 0
    page = parse(tmp_path / "a.html")
    assert "sensitivity" in page.ids and len(page.images) == 1
    assert "OWL@50%" in (tmp_path / "a.md").read_text()
