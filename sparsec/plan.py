"""The plan: which passes run, in which order, why, and what each buys on the target.

This first version takes the target's default pass spec or the user's ``--passes`` and
explains every step with the target's facts (:mod:`sparsec.targets`). It says so plainly when
a step buys no speed on the target, before anything is pruned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sparsec.pipeline import Pass, options_dict, parse_pass_specs
from sparsec.targets import Gain, Target


@dataclass
class PlanStep:
    spec: str
    pass_id: str
    kind: str
    form: str
    reason: str
    gain: Gain


@dataclass
class Plan:
    target: str
    steps: list[PlanStep]
    notes: list[str] = field(default_factory=list)
    _passes: list[Pass] = field(default_factory=list, repr=False)

    @property
    def passes(self) -> list[Pass]:
        return list(self._passes)

    @property
    def exact(self) -> bool:
        """True when every step is an exact rewrite (outputs must match to fp tolerance)."""
        return all(step.kind == "exact" for step in self.steps)

    @property
    def predicts_speedup(self) -> bool:
        return any(step.gain.speedup for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "notes": self.notes,
                "steps": [asdict(step) for step in self.steps],
                "passes": [{"id": p.id, "options": options_dict(p.options)} for p in self._passes]}

    def lines(self) -> list[str]:
        out = [f"plan for target '{self.target}':"]
        if not self.steps:
            out.append("  (no passes)")
        for i, step in enumerate(self.steps, 1):
            speed = "gains speed" if step.gain.speedup else "no speed gain"
            out.append(f"  {i}. {step.spec} [{step.kind}] - {step.reason}")
            out.append(f"     on {self.target}: {speed}: {step.gain.how} ({step.gain.evidence})")
        out.extend(f"  note: {n}" for n in self.notes)
        return out


def make_plan(target: Target, passes: list[Pass] | str | None = None) -> Plan:
    """Plan for ``target``: the given passes, or the target's defaults when None."""
    notes: list[str] = []
    if passes is None:
        chosen = parse_pass_specs(target.default_passes) if target.default_passes else []
        reason = f"target default: {target.default_reason}"
        if not chosen:
            notes.append(f"no pass by default on '{target.name}': {target.default_reason};"
                         " give --passes to run one anyway")
    else:
        chosen = parse_pass_specs(passes) if isinstance(passes, str) else list(passes)
        reason = "requested with --passes"
    steps = []
    for p in chosen:
        form = p.sparse_form()
        steps.append(PlanStep(p.spec(), p.id, p.kind.value, form, f"{p.summary}; {reason}", target.gain(form)))
    plan = Plan(target.name, steps, notes, chosen)
    if steps and not plan.predicts_speedup:
        notes.append(f"sparsec predicts no speedup on '{target.name}' for this plan: no execution"
                     " provider there has a kernel for these layouts (smaller storage needs"
                     " compressed weights)")
    return plan
