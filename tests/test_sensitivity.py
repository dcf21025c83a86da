"""Per-layer sensitivity: pruning one layer more moves the outputs more; OWL keeps the mean."""

import numpy as np
import pytest

from sparsec.data import load_calibration
from sparsec.model_io import load_model
from sparsec.sensitivity import layer_sensitivity


@pytest.fixture(scope="module")
def tiny(zoo_path):
    model = load_model(zoo_path("tiny-llama")).model
    return model, load_calibration("builtin", model, samples=4, seqlen=32)


def test_drop_grows_with_sparsity_for_every_layer(tiny):
    model, calibration = tiny
    result = layer_sensitivity(model, calibration, levels=(0.2, 0.5, 0.8), method="magnitude")
    assert [l.layer for l in result.layers] == ["m.model.layers.0", "m.model.layers.1"]
    for layer in result.layers:
        drops = [layer.drop[str(level)] for level in (0.2, 0.5, 0.8)]
        assert 0 < drops[0] < drops[1] < drops[2] < 2, (layer.layer, drops)
        assert layer.params == 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 192  # q, k, v, o, gate/up/down
    assert result.allocation is None and "first half" in result.inputs
    # The model is left as it was: the weights under study became inputs only for the run.
    assert not any(v.is_initializer() for v in model.graph.inputs)


def test_wanda_sensitivity_gives_an_owl_allocation_around_the_target(tiny):
    model, calibration = tiny
    per_site = layer_sensitivity(model, calibration, levels=(0.5,), method="wanda", target=0.6, by="site")
    assert len(per_site.layers) == 14
    result = layer_sensitivity(model, calibration, levels=(0.5,), method="wanda", target=0.6)
    layers = result.allocation["layers"]
    sparsities = np.array([v["sparsity"] for v in layers.values()])
    assert abs(sparsities.mean() - 0.6) < 1e-6 and np.all(np.abs(sparsities - 0.6) <= 0.08 + 1e-9)
    assert "OWL@60%" in "\n".join(result.lines())
