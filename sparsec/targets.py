"""Hardware targets: which execution provider runs the model and which sparse forms it speeds up.

A target never claims speed that no kernel delivers. Each entry of ``gains`` says, for one
sparse form, whether an ONNX Runtime execution provider on that target has a kernel that turns
it into speed, and where the figure comes from (measured here, or not measured). The facts are
those of ../shared/DESIGN.md and the tables under docs/.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sparsec.errors import OptionError

# Sparse forms a pass can produce.
NM_2_4 = "nm-2:4"
NM_OTHER = "nm-other"
UNSTRUCTURED = "unstructured"
BLOCK = "block"
STRUCTURED = "structured"


@dataclass(frozen=True)
class Gain:
    """What one sparse form buys on a target."""

    speedup: bool  # does any provider on this target run it faster?
    how: str  # which provider / kernel, or why nothing does
    evidence: str = "not measured by sparsec"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    providers: tuple[Any, ...]  # in priority order, as ORT takes them
    gains: dict[str, Gain] = field(default_factory=dict)
    default_passes: str = ""  # pass spec the plan uses when none is given
    default_reason: str = ""

    def gain(self, form: str) -> Gain:
        return self.gains.get(form, Gain(False, "no kernel on this target"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["providers"] = [p if isinstance(p, str) else p[0] for p in self.providers]
        return data


_STORAGE_ONLY = "no sparse GEMM kernel: ORT densifies the weights; the gain is a smaller file once compressed storage is used"

_CPU_GAINS = {
    NM_2_4: Gain(False, f"CPU EP: {_STORAGE_ONLY}"),
    NM_OTHER: Gain(False, f"CPU EP: {_STORAGE_ONLY}"),
    UNSTRUCTURED: Gain(False, f"CPU EP: {_STORAGE_ONLY}"),
    BLOCK: Gain(False, f"CPU EP: {_STORAGE_ONLY}"),
    STRUCTURED: Gain(True, "CPU EP: smaller dense matrices, every kernel runs less work"),
}

_GPU_NM = (
    "TensorRT EP with trt_sparsity_enable=1 (fp16/int8 engines) picks 2:4 sparse tactics;"
    " the CUDA EP has no 2:4 kernel and runs the weights dense"
)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "cpu",
            "x86-64 / Arm server CPU, ONNX Runtime CPU execution provider",
            ("CPUExecutionProvider",),
            _CPU_GAINS,
            default_passes="",
            default_reason="the CPU EP turns no weight-sparsity layout into speed; structured"
            " pruning (removing whole neurons) is the form that pays here",
        ),
        Target(
            "edge",
            "small Arm / x86 CPU (phones, boards), ONNX Runtime CPU execution provider",
            ("CPUExecutionProvider",),
            _CPU_GAINS,
            default_passes="",
            default_reason="like cpu: only smaller dense matrices pay; N:M only shrinks storage",
        ),
        Target(
            "ampere",
            "NVIDIA Ampere (A100, A10, RTX 30): ORT TensorRT EP, CUDA EP as fallback",
            (("TensorrtExecutionProvider", {"trt_sparsity_enable": True, "trt_fp16_enable": True}),
             "CUDAExecutionProvider", "CPUExecutionProvider"),
            {
                NM_2_4: Gain(True, _GPU_NM, "not measured by sparsec (TensorRT is not installable"
                             " on the test machines); published figures are per-GEMM and size-dependent"),
                NM_OTHER: Gain(False, "no kernel for N:M other than 2:4"),
                UNSTRUCTURED: Gain(False, "CUDA / TensorRT EP: no unstructured sparse GEMM"),
                BLOCK: Gain(False, "CUDA / TensorRT EP: no block-sparse weight GEMM"),
                STRUCTURED: Gain(True, "smaller dense matrices on every EP"),
            },
            default_passes="nm:n=2,m=4",
            default_reason="2:4 along the reduction axis is the layout Ampere sparse tensor cores"
            " run; only the TensorRT EP uses them",
        ),
        Target(
            "hopper",
            "NVIDIA Hopper (H100, H200): ORT TensorRT EP, CUDA EP as fallback",
            (("TensorrtExecutionProvider", {"trt_sparsity_enable": True, "trt_fp16_enable": True}),
             "CUDAExecutionProvider", "CPUExecutionProvider"),
            {
                NM_2_4: Gain(True, _GPU_NM + "; on H100 2:4 GEMMs measured slower than dense at"
                             " small and medium sizes (published H100 results 0.4-1.2x)",
                             "cuSPARSELt probe on an H100 (../shared/DESIGN.md); TensorRT not run"),
                NM_OTHER: Gain(False, "no kernel for N:M other than 2:4"),
                UNSTRUCTURED: Gain(False, "CUDA / TensorRT EP: no unstructured sparse GEMM"),
                BLOCK: Gain(False, "CUDA / TensorRT EP: no block-sparse weight GEMM"),
                STRUCTURED: Gain(True, "smaller dense matrices on every EP"),
            },
            default_passes="nm:n=2,m=4",
            default_reason="2:4 is the only weight layout Hopper tensor cores accelerate; expect"
            " little or no gain below large GEMMs",
        ),
    )
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise OptionError(f"unknown target '{name}' (known: {', '.join(TARGETS)})")
    return TARGETS[name]

