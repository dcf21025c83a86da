"""The plan: which passes run, in which order, why, what each buys on the target, and the budget.

The plan is made after the model is analyzed. It takes the user's passes (``--passes`` or a
recipe) or the target's default, explains every step with the target's facts
(:mod:`sparsec.targets`) and says plainly when a step buys no speed there, before anything is
pruned. It also fixes what the result is judged against:

* an exact plan must reproduce the original to fp tolerance;
* a lossy plan gets a fidelity budget: the user's, else a default per task (the model's task
  metric when it has real evaluation data, else every output's cosine);
* passes that must see every other pass's result (``quantize``) run last, whatever order the
  user wrote;
* where calibration data is available (``--calib`` or an example model's built-in text),
  options the user left at their default take their calibration-aware value (``method``:
  SparseGPT for weight pruning, activation scores for structured pruning).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from sparsec.pipeline import Pass, options_dict, parse_pass_specs
from sparsec.targets import Gain, Target
from sparsec.verify import Budget

# Default fidelity budgets of lossy plans, per task (what the task metric measures).
DEFAULT_BUDGETS: dict[str, Budget] = {
    "encoder": Budget(min_embedding_cosine=0.95, origin="default"),
    "decoder": Budget(max_ppl_ratio=1.2, origin="default"),
    "": Budget(min_cosine=0.99, origin="default"),
}
BUDGET_FLAGS = "--min-cosine, --min-embedding-cosine or --max-ppl-increase"


@dataclass
class PlanStep:
    spec: str
    pass_id: str
    kind: str
    form: str
    reason: str
    gain: Gain
    calibrated: bool = False  # runs on calibration data


@dataclass
class Plan:
    target: str
    steps: list[PlanStep]
    budget: Budget | None = None  # None for exact plans: they must match to fp tolerance
    calibration: str = ""  # what calibration data the passes run on ("" when none is needed)
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
    def needs_calibration(self) -> bool:
        return any(step.calibrated for step in self.steps)

    @property
    def tolerance_floor(self) -> tuple[float, float] | None:
        """The largest ``reorder_tolerance`` of the plan's passes (float outputs are compared at
        least this loosely), or None."""
        floors = [p.reorder_tolerance for p in self._passes if p.reorder_tolerance is not None]
        return (max(f[0] for f in floors), max(f[1] for f in floors)) if floors else None

    @property
    def predicts_speedup(self) -> bool:
        return any(step.gain.speedup for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "notes": self.notes, "exact": self.exact,
                "budget": self.budget.to_dict() if self.budget else None, "calibration": self.calibration,
                "steps": [{**asdict(step), "gain": {k: v for k, v in asdict(step.gain).items() if k != "facts"}}
                          for step in self.steps],
                "passes": [{"id": p.id, "options": options_dict(p.options)} for p in self._passes]}

    def lines(self) -> list[str]:
        out = [f"plan for target '{self.target}':"]
        if not self.steps:
            out.append("  (no passes)")
        for i, step in enumerate(self.steps, 1):
            g = step.gain
            speed = "gains speed" if g.speedup and not g.depends else (
                "gains speed under some conditions" if g.speedup else "no speed gain")
            out.append(f"  {i}. {step.spec} [{step.kind}] - {step.reason}")
            out.append(f"     on {self.target}: {speed}: {g.how} ({g.evidence})")
        if self.calibration:
            out.append(f"  calibration: {self.calibration}")
        if self.budget is not None:
            origin = {"default": "default for this model; set another with " + BUDGET_FLAGS
                      + ", or write anyway with --best-effort"}.get(self.budget.origin, self.budget.origin)
            out.append(f"  fidelity budget: {self.budget.describe()} ({origin})")
        elif self.steps:
            out.append("  exact: the result must match the original to fp tolerance")
        out.extend(f"  note: {n}" for n in self.notes)
        return out


def _calibration_aware(p: Pass) -> Pass:
    """``p`` with every option the user left at its default set to its calibration-aware value."""
    changes = {}
    for f in dataclasses.fields(p.options):
        better = f.metadata.get("calibrated_default")
        if better is not None and f.name not in p.explicit and getattr(p.options, f.name) != better:
            changes[f.name] = better
    if not changes:
        return p
    return type(p)(**{**{k: v for k, v in options_dict(p.options).items() if k in p.explicit}, **changes},
                   _explicit=p.explicit)


def make_plan(target: Target, passes: list[Pass] | str | None = None, *, task: str = "",
              budget: Budget | None = None, calibration: str = "", chosen_by: str = "") -> Plan:
    """Plan for ``target``: the given passes, or the target's defaults when None.

    Args:
        task: the model's task metric ("encoder", "decoder" or "" for none): picks the default
            budget of a lossy plan.
        budget: the user's fidelity budget (None or empty: the default for the task).
        calibration: a description of the calibration data available ("" when there is none);
            with some, options left at their defaults take their calibration-aware values.
        chosen_by: who chose ``passes`` when not the user ("the planner").
    """
    notes: list[str] = []
    if passes is None:
        chosen = parse_pass_specs(target.default_passes) if target.default_passes else []
        reason = f"target default: {target.default_reason}"
        if not chosen:
            notes.append(f"no pass by default on '{target.name}': {target.default_reason};"
                         " give --passes to run one anyway")
    else:
        chosen = parse_pass_specs(passes) if isinstance(passes, str) else list(passes)
        reason = f"chosen by {chosen_by} (--explain says why)" if chosen_by else "requested with --passes"
    ordered = sorted(chosen, key=lambda p: p.order)
    if ordered != chosen:
        moved = [p.id for i, p in enumerate(chosen) if p.order and p is not ordered[i]]
        notes.append(f"{', '.join(dict.fromkeys(moved))} reordered: quantize runs after the sparsity passes (quantized"
                     " weights are integer codes that no other pass rewrites) and compress after everything (it"
                     " packs the final weights)")
        chosen = ordered
    if calibration:
        upgraded = [_calibration_aware(p) for p in chosen]
        for before, after in zip(chosen, upgraded):
            if after is not before and not chosen_by:
                notes.append(f"{before.id}: calibration data is available, so {after.spec()} replaces the"
                             f" calibration-free default (set method=... to choose)")
        chosen = upgraded
    steps = []
    for p in chosen:
        form = p.sparse_form()
        steps.append(PlanStep(p.spec(), p.id, p.kind.value, form, f"{p.summary}; {reason}", target.gain(form),
                              p.needs_calibration()))
    plan = Plan(target.name, steps, None, "", notes, chosen)
    if plan.needs_calibration:
        plan.calibration = calibration or "none available"
    if steps and not plan.exact:
        plan.budget = budget if budget is not None and not budget.empty else DEFAULT_BUDGETS[task]
    if plan.tolerance_floor is not None:
        names = ", ".join(p.id for p in chosen if p.reorder_tolerance is not None)
        notes.append(f"{names}: exact up to the order of floating-point sums (a fused kernel); float outputs"
                     f" are compared at atol {plan.tolerance_floor[0]:g}, rtol {plan.tolerance_floor[1]:g} or"
                     " the dtype's defaults, whichever is looser")
    if steps and not plan.predicts_speedup:
        notes.append(f"sparsec predicts no speedup on '{target.name}' for this plan: no execution"
                     " provider there has a kernel for these layouts (smaller storage needs"
                     " compressed weights)")
    return plan
