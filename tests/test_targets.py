"""The target registry is data: per provider and form, a verdict with measured evidence whose
sources exist; targets pick their best provider; runners keep only available providers."""

import re

import pytest

from sparsec.errors import OptionError
from sparsec.targets import FORMS, get_target, targets
from tests.test_readme import ROOT


def test_registry_targets_and_unknown_target():
    assert {"cpu", "edge", "ampere", "hopper"} <= set(targets())
    with pytest.raises(OptionError, match="unknown target 'tpu'"):
        get_target("tpu")


@pytest.mark.parametrize("form,speedup,depends", [
    ("nm-2:4", False, False), ("unstructured", False, False), ("structured", True, False),
    ("moe", True, False), ("attention-window", False, False), ("attention-block-sparse", False, False),
    ("kv-window", True, False), ("masked", False, False),
])
def test_cpu_gains(form, speedup, depends):
    gain = get_target("cpu").gain(form)
    assert (gain.speedup, gain.depends) == (speedup, depends), gain
    assert gain.provider == "CPUExecutionProvider"


def test_gpu_targets_take_their_best_provider_and_keep_the_others_facts():
    gain = get_target("ampere").gain("nm-2:4")
    assert gain.provider == "TensorrtExecutionProvider" and gain.speedup and gain.depends
    cuda = next(f for f in gain.facts if f.provider == "CUDAExecutionProvider")
    assert cuda.speedup == "no" and "CUDA EP has no 2:4 kernel" in cuda.how
    assert get_target("hopper").gain("attention-block-sparse").provider == "CUDAExecutionProvider"
    moe = get_target("hopper").gain("moe")
    assert moe.depends and "0.6-0.8x" in moe.evidence and "1.61-1.87x" in moe.evidence


def test_every_measured_source_is_a_file_in_the_repository():
    cited = set()
    for target in targets().values():
        for form in FORMS:
            for fact in target.gain(form).facts:
                for e in fact.evidence:
                    assert e.source.startswith(("measured by sparsec: ", "published: ", "not measured",
                                                "ONNX Runtime")), e.source
                    match = re.match(r"measured by sparsec: (\S+)", e.source)
                    if match:
                        cited.add(match.group(1))
                    if e.speedup is not None:
                        assert 0 < e.speedup[0] <= e.speedup[1] and e.conditions, e
    assert cited and all((ROOT / path).exists() for path in cited), cited


def test_runner_keeps_available_providers_and_says_which_are_missing():
    runner = get_target("ampere").runner()
    assert runner.provider_names[-1] == "CPUExecutionProvider"
    from sparsec.runtime.session import available_providers

    missing = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p not in available_providers()]
    if missing:
        assert all(p not in runner.provider_names for p in missing)
        assert missing[0] in runner.notes[0] and "target 'ampere' ran on" in runner.notes[0]
    assert get_target("cpu").runner().notes == []


def test_to_dict_lists_every_form():
    data = get_target("edge").to_dict()
    assert set(data["gains"]) == set(FORMS) and data["providers"] == ["CPUExecutionProvider"]


def test_every_target_has_hardware_figures_with_sources(capsys):
    from sparsec.cli import main
    from sparsec.cost import published_profile
    from sparsec.targets import targets

    for target in targets().values():
        hw = target.hardware
        assert hw["peak_flops"] and hw["bandwidth"] > 0 and hw["sources"], target.name
        profile = published_profile(target)
        assert profile.gemm_rate(1e12) < max(hw["peak_flops"].values())  # below the peak, never above
        assert "published" in profile.source
    gpu = targets()["hopper"].hardware
    assert abs(gpu["sparse_flops"]["fp16"] / gpu["peak_flops"]["fp16"] - 2) < 1e-2  # 2:4 doubles the tensor-core peak
    assert main(["targets"]) == 0
    assert "ada: NVIDIA Ada" in capsys.readouterr().out
