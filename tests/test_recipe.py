"""Recipes: (config, expected error) pairs, and save -> replay reproduces the compile exactly."""

import json

import pytest
import yaml

from sparsec.cli import main
from sparsec.errors import InputError, OptionError
from sparsec.recipe import load_recipe
from tests.helpers import linear, save


@pytest.mark.parametrize("data,error", [
    ([1, 2], "a recipe is a mapping"),
    ({"targets": "cpu"}, "unknown recipe key 'targets'"),
    ({"version": 2}, "recipe version 2 is not supported"),
    ({"target": "tpu"}, "unknown target 'tpu'"),
    ({"passes": {"id": "nm"}}, "'passes' must be a list"),
    ({"passes": [{"id": "nm", "options": {"n": 5}}]}, "n must be smaller than m"),
    ({"passes": [{"id": "nm", "opts": {}}]}, "unknown key 'opts'"),
    ({"passes": [{"id": "prune"}]}, "unknown pass 'prune'"),
    ({"budget": {"min_cosine": 2}}, "min_cosine must be a number in"),
    ({"budget": {"max_rel_err": -0.1}}, "max_rel_err must be a number >= 0"),
    ({"budget": {"max_loss": 1}}, "'budget' has unknown key 'max_loss'"),
    ({"calibration": {"file": "x"}}, "'calibration' has unknown key 'file'"),
    ({"calibration": {"unit": "sentences"}}, "calibration.unit must be one of windows, lines"),
])
def test_invalid_recipes(tmp_path, data, error):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OptionError, match=error):
        load_recipe(path)


def test_unreadable_recipes(tmp_path):
    (tmp_path / "r.yaml").write_text("passes: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_recipe(tmp_path / "r.yaml")
    with pytest.raises(InputError, match="no such recipe"):
        load_recipe(tmp_path / "none.json")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_then_replay_is_byte_identical(tmp_path, capsys, suffix):
    model = save(linear(k=128, n=64), tmp_path / "m.onnx")
    recipe = tmp_path / f"r{suffix}"
    assert main(["compile", str(model), "--target", "ampere", "--passes", "nm:n=1,m=4;compress",
                 "--min-cosine", "0.5", "--seed", "3", "-o", str(tmp_path / "a.onnx"),
                 "--save-recipe", str(recipe)]) == 0
    data = yaml.safe_load(recipe.read_text())
    assert data["target"] == "ampere" and data["budget"] == {"min_cosine": 0.5}
    assert data["passes"][0]["options"]["n"] == 1 and "min_params" in data["passes"][0]["options"]
    assert data["verification"]["seed"] == 3
    assert main(["compile", str(model), "--recipe", str(recipe), "-o", str(tmp_path / "b.onnx")]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    ra = json.loads((tmp_path / "a.report.json").read_text())
    rb = json.loads((tmp_path / "b.report.json").read_text())
    assert ra["plan"]["passes"] == rb["plan"]["passes"]
    assert main(["compile", str(model), "--recipe", str(recipe), "--target", "cpu", "-o", str(tmp_path / "c.onnx")]) == 2


def test_command_line_calibration_overrides_the_recipes(tmp_path):
    import numpy as np

    model = save(linear(k=128, n=64), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    for name in ("own", "users"):  # two draws of channel scales: different data, different Wanda masks
        np.savez(tmp_path / f"{name}.npz", X=(rng.standard_normal((64, 128)) * rng.uniform(0.1, 3, 128)).astype(np.float32))
    recipe = tmp_path / "r.yaml"
    common = ["--best-effort", "--json"]
    assert main(["compile", str(model), "--passes", "unstructured:sparsity=0.5,method=wanda", "--calib",
                 str(tmp_path / "own.npz"), "-o", str(tmp_path / "a.onnx"), "--save-recipe", str(recipe), *common]) == 0
    assert yaml.safe_load(recipe.read_text())["calibration"]["source"] == str(tmp_path / "own.npz")
    assert main(["compile", str(model), "--recipe", str(recipe), "-o", str(tmp_path / "b.onnx"), *common]) == 0
    assert main(["compile", str(model), "--recipe", str(recipe), "--calib", str(tmp_path / "users.npz"),
                 "-o", str(tmp_path / "c.onnx"), *common]) == 0
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert "users.npz" in report["calibration"]["source"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "c.onnx").read_bytes()
    # the other flags a recipe fixes stay refused
    assert main(["compile", str(model), "--recipe", str(recipe), "--passes", "nm", "-o", str(tmp_path / "d.onnx")]) == 2
    assert main(["compile", str(model), "--recipe", str(recipe), "--calib-unit", "phrases",
                 "-o", str(tmp_path / "d.onnx")]) == 2


def test_the_python_api_takes_a_recipe(tmp_path):
    from sparsec.compiler import compile
    from sparsec.recipe import Recipe

    model = save(linear(k=128, n=64), tmp_path / "m.onnx")
    recipe = Recipe(target="ampere", passes="nm:n=1,m=4", budget={"min_cosine": 0.5}, verification={"seed": 3})
    result = compile(model, recipe, output=tmp_path / "a.onnx")
    assert result.passed and result.plan.steps[0].spec == "nm:n=1" and result.recipe.verification["seed"] == 3
    assert Recipe.from_options(target="ampere", passes="nm:n=1,m=4", min_cosine=0.5, seed=3).to_dict() == \
        {**recipe.to_dict(), "calibration": {}, "verification": {"seed": 3}}
    with pytest.raises(OptionError, match="unknown compile option 'targets'"):
        compile(model, output=tmp_path / "b.onnx", targets="cpu")
    with pytest.raises(OptionError, match="either a recipe or compile options"):
        compile(model, recipe, output=tmp_path / "c.onnx", seed=1)
