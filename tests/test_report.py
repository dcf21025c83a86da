"""Reports: JSON, Markdown, and one self-contained HTML file that renders (structure checked
with an HTML parser, embedded PNGs decoded); sweeps and the Python API."""

import json
import re
from html.parser import HTMLParser
from xml.etree import ElementTree

import pytest

import sparsec
from sparsec.cli import main
from sparsec.errors import OptionError


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.external, self.tables = set(), [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag in ("link", "script", "img") or attrs.get("href", "").startswith("http"):
            self.external.append(tag)
        self.tables += tag == "table"


def parse(path):
    """The page's structure; every inline SVG plot parses as XML and draws marks with figures."""
    text = path.read_text()
    page = _Page()
    page.feed(text)
    page.images = re.findall(r"<svg .*?</svg>", text, flags=re.S)
    for image in page.images:
        root = ElementTree.fromstring(image)
        marks = [e for e in root.iter() if e.tag.split("}")[-1] in ("rect", "circle", "polyline")]
        assert marks and any(e.find("{http://www.w3.org/2000/svg}title") is not None for e in marks), image[:200]
    return page


def test_html_markdown_and_json_reports(zoo_path, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(["compile", str(zoo_path("tiny-llama")), "--passes", "nm:min_params=0", "--best-effort", "-o", str(out),
                 "--report", str(tmp_path / "r.html"), "--report", str(tmp_path / "r.md"),
                 "--report", str(tmp_path / "r.json"), "--benchmark"])
    assert code == 0
    page = parse(tmp_path / "r.html")
    assert {"summary", "plan", "passes", "verdict", "verification", "damage", "pareto", "size"} <= page.ids
    assert not page.external and page.tables >= 3 and len(page.images) == 3
    html_text = (tmp_path / "r.html").read_text()
    verdict = json.loads((tmp_path / "r.json").read_text())["judgement"]["status"]
    assert verdict in ("WITHIN BUDGET", "BELOW BUDGET") and "PASSED" not in html_text  # lossy: never PASSED
    assert f"<td class='{'ok' if verdict == 'WITHIN BUDGET' else 'bad'}'>{verdict}: perplexity ratio" in html_text
    # The per-site map shows how far each weight moved (SparseGPT: output error), not a flat 50%.
    assert "relative output error on calibration data" in html_text
    md = (tmp_path / "r.md").read_text()
    assert "## Plan" in md and "| nm | lossy |" in md and "perplexity_candidate" in md and "## Verdict" in md
    assert "| NOT_CONSTANT | 5 | the weight is computed at run time" in md  # attention matmuls, tied lm_head
    assert "the weight is computed at run time" in html_text
    data = json.loads((tmp_path / "r.json").read_text())
    speed = data["speed"]
    assert speed["speedup_p10"] <= speed["speedup"] <= speed["speedup_p90"] and speed["repeats"] >= 15
    assert speed["speedup"] == pytest.approx(speed["original_ms"] / speed["compiled_ms"], rel=0.5)
    assert len(data["weights_after"]) == 14
    assert "speed:" in capsys.readouterr().out
    assert main(["compile", str(zoo_path("tiny-llama")), "-o", str(out), "--report", str(tmp_path / "r.pdf")]) == 2


def test_sweep_with_pareto_report(zoo_path, tmp_path, capsys):
    code = main(["sweep", str(zoo_path("tiny-bert")), "--passes", "ffn-neurons:ratio=0.5",
                 "--passes", "attention-heads:ratio=0.5", "--repeats", "3",
                 "--report", str(tmp_path / "s.html"), "--report", str(tmp_path / "s.json")])
    assert code == 0
    page = parse(tmp_path / "s.html")
    assert "pareto" in page.ids and len(page.images) == 1
    data = json.loads((tmp_path / "s.json").read_text())
    assert [p["label"] for p in data["points"]][0] == "original" and len(data["points"]) == 3
    assert any(p["pareto"] for p in data["points"])
    assert "| original | - | 1.0000 |" in capsys.readouterr().out


def test_python_api_mirrors_the_cli(zoo_path, tmp_path):
    import onnx

    result = sparsec.compile(str(zoo_path("tiny-bert")), target="ampere", passes="nm:min_params=0", best_effort=True,
                             output=tmp_path / "a.onnx")
    assert result.records[0].pass_id == "nm" and result.report()["target"] == "ampere"
    proto = onnx.load(str(zoo_path("cnn")))
    result = sparsec.compile(proto, passes="conv-channels:multiple=1", output=tmp_path / "b.onnx")
    assert result.output.exists() and result.records[0].changed
    with pytest.raises(OptionError, match="output"):
        sparsec.compile(proto, passes="nm")
    assert sparsec.testing.assert_equivalent(tmp_path / "a.onnx", tmp_path / "a.onnx").passed
