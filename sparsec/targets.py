"""Hardware targets: which execution providers run the model and which sparse forms they speed up.

The registry is data (``targets.yaml`` beside this module): per execution provider and sparse
form, whether a kernel turns the form into speed (yes / no / depends), how, and the evidence --
measured speedup ranges with their conditions and sources. A target lists its providers in
priority order; what a form gains on a target is what its best provider for that form gains.
A target never claims speed that no kernel delivers; a cost model reads the same facts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sparsec.errors import OptionError

# Sparse forms a pass can produce.
NM_2_4 = "nm-2:4"
NM_OTHER = "nm-other"
UNSTRUCTURED = "unstructured"
BLOCK = "block"
STRUCTURED = "structured"
STORAGE = "storage"
MOE = "moe"
ATTENTION_WINDOW = "attention-window"
ATTENTION_BLOCK_SPARSE = "attention-block-sparse"
KV_WINDOW = "kv-window"
MASKED = "masked"  # computation masked in standard ops (an attention mask, a portable MoE)
INT8_DYNAMIC = "int8-dynamic"  # int8 weights, activations quantized at run time (MatMulInteger)
INT8_QDQ = "int8-qdq"  # int8 weights and calibrated activations as QuantizeLinear/DequantizeLinear
INT4 = "int4"  # 4-bit blocked weights in com.microsoft.MatMulNBits
QMOE = "qmoe"  # MoE experts stored as int8 / int4 codes in com.microsoft.QMoE
FORMS = (NM_2_4, NM_OTHER, UNSTRUCTURED, BLOCK, STRUCTURED, STORAGE, MOE, ATTENTION_WINDOW,
         ATTENTION_BLOCK_SPARSE, KV_WINDOW, MASKED, INT8_DYNAMIC, INT8_QDQ, INT4, QMOE)

REGISTRY = Path(__file__).with_name("targets.yaml")


@dataclass(frozen=True)
class Evidence:
    """One measurement or statement behind a fact."""

    source: str  # "measured by sparsec: <file>", "published: <reference>", "not measured ..."
    speedup: tuple[float, float] | None = None  # dense time / sparse time, low..high
    conditions: str = ""

    def line(self) -> str:
        figure = (f"{self.speedup[0]:g}x" if self.speedup[0] == self.speedup[1]
                  else f"{self.speedup[0]:g}-{self.speedup[1]:g}x") if self.speedup else ""
        parts = [p for p in (figure, self.conditions) if p]
        return f"{', '.join(parts)} ({self.source})" if parts else self.source


@dataclass(frozen=True)
class Fact:
    """What one execution provider does with one sparse form."""

    provider: str
    form: str
    speedup: str  # yes | no | depends
    how: str
    evidence: tuple[Evidence, ...] = ()


@dataclass(frozen=True)
class Gain:
    """What one sparse form buys on a target: the best provider's fact."""

    speedup: bool  # does some provider of this target run it faster, at least under some conditions?
    how: str
    evidence: str = "not measured by sparsec"
    depends: bool = False  # pays only under the conditions the evidence names
    provider: str = ""
    facts: tuple[Fact, ...] = ()


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    providers: tuple[Any, ...]  # in priority order, as ORT takes them (name or (name, options))
    facts: dict[str, dict[str, Fact]] = field(default_factory=dict)  # provider -> form -> fact
    default_passes: str = ""  # pass spec the plan uses when none is given
    default_reason: str = ""
    # peak_flops {dtype: FLOP/s dense}, sparse_flops {dtype: FLOP/s with 2:4}, bandwidth (bytes/s),
    # devices, sources: what the cost model starts from without a measured profile
    hardware: dict[str, Any] = field(default_factory=dict)

    @property
    def provider_names(self) -> list[str]:
        return [p if isinstance(p, str) else p[0] for p in self.providers]

    def gain(self, form: str) -> Gain:
        """What ``form`` gains on the provider that would run it: ONNX Runtime gives a node to
        the first provider in priority order with a kernel for it, so the first provider with a
        fact for the form decides; the others' facts come along for the record."""
        facts = tuple(self.facts[p][form] for p in self.provider_names if form in self.facts.get(p, {}))
        if not facts:
            return Gain(False, "no kernel on this target", "not measured by sparsec")
        best = facts[0]
        evidence = "; ".join(e.line() for e in best.evidence) or "no kernel"
        return Gain(best.speedup != "no", f"{_short(best.provider)}: {best.how}", evidence,
                    best.speedup == "depends", best.provider, facts)

    def runner(self, threads: int | None = None):
        """The session runner of this target: its providers this onnxruntime build has."""
        from sparsec.runtime.session import Runner

        return Runner.for_providers(self.providers, threads=threads, what=f"target '{self.name}'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "providers": self.provider_names,
            "default_passes": self.default_passes, "default_reason": self.default_reason,
            "hardware": self.hardware,
            "gains": {form: _gain_dict(self.gain(form)) for form in FORMS},
        }


def _gain_dict(gain: Gain) -> dict[str, Any]:
    data = asdict(gain)
    data["facts"] = [{**asdict(f), "evidence": [asdict(e) for e in f.evidence]} for f in gain.facts]
    return data


def _short(provider: str) -> str:
    return {"CPUExecutionProvider": "CPU EP", "CUDAExecutionProvider": "CUDA EP",
            "TensorrtExecutionProvider": "TensorRT EP"}.get(provider, provider)


def _yes_no(value: Any) -> str:
    # YAML reads bare yes/no as booleans.
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if value not in ("yes", "no", "depends"):
        raise ValueError(f"speedup must be yes, no or depends, not {value!r}")
    return value


@lru_cache(maxsize=1)
def _load() -> dict[str, Target]:
    import yaml

    data = yaml.safe_load(REGISTRY.read_text(encoding="utf-8"))
    facts: dict[str, dict[str, Fact]] = {}
    for provider, forms in data["providers"].items():
        facts[provider] = {}
        for form, fact in forms.items():
            if form not in FORMS:
                raise ValueError(f"{REGISTRY.name}: unknown form '{form}' for {provider}")
            evidence = tuple(Evidence(e["source"], tuple(e["speedup"]) if e.get("speedup") else None,
                                      e.get("conditions", "")) for e in fact.get("evidence") or ())
            facts[provider][form] = Fact(provider, form, _yes_no(fact["speedup"]), fact["how"], evidence)
    targets = {}
    for name, entry in data["targets"].items():
        providers = tuple(p if isinstance(p, str) else (p[0], dict(p[1])) for p in entry["providers"])
        names = [p if isinstance(p, str) else p[0] for p in providers]
        targets[name] = Target(name, entry["description"], providers, {p: facts.get(p, {}) for p in names},
                               entry.get("default_passes", ""), entry.get("default_reason", ""),
                               dict(entry.get("hardware") or {}))
    return targets


def targets() -> dict[str, Target]:
    """Every target of the registry, by name."""
    return dict(_load())


def get_target(name: str) -> Target:
    known = _load()
    if name not in known:
        raise OptionError(f"unknown target '{name}' (known: {', '.join(known)})")
    return known[name]
