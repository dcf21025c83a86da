"""The planner: which rewrite each site gets on a target, under a fidelity budget.

When ``sparsec compile`` is given a budget and no passes, the planner chooses them:

1. **Sites and options.** Every FFN (``ffn-neurons`` at 25/50/75% of its neurons, or ``moe``
   with 2 or 4 of 8 experts), every attention block (``attention-heads`` at 25/50%), for
   decoders the attention fusion (``attention``, exact), and the whole model's ONNX Runtime
   quantization (``quantize``: int8 dynamic or 4-bit MatMulNBits; its speed from the profile's
   measured quantized rates, none on a profile without them). A form the target's providers do not
   accelerate is rejected before anything is computed (the targets registry says why), and so
   is an option the cost model predicts no gain for.
2. **Each option alone.** The pass runs on that site only, fitted on most of the calibration
   sets; the cost model (:mod:`sparsec.cost`) predicts what it saves on the workload, and its
   fidelity is measured on the calibration sets kept out of the fitting, with the budget's own
   metric (held-out text is kept for the final verdict). Its *budget use* is how much of the budget it spends: ``(1 - cos) / (1 - min_cos)``,
   ``(ppl ratio - 1) / (max ratio - 1)``.
3. **Choice.** Options are taken greedily by predicted saving per unit of budget use, at most
   one per site, while the summed use stays under :data:`SAFETY`. The combination is measured
   end to end on the calibration inputs: drops compound rather than add, so the limit on the
   summed use is rescaled by what the combination really used (down when it missed the budget,
   up when it left much of it unused) and the choice made again (at most :data:`MAX_RETRIES`
   times); one still over budget loses its weakest options one by one.
   Measured on the sets the passes were not fitted on: scored on their own fitting data, MiniLM's
   structured options looked 5x cheaper than they were on held-out text.
   The compile then verifies the result on held-out inputs like any plan.

On deep models (more than :data:`MAX_SITES` sites of a family) the options are per group of
consecutive sites. Step 2 fits every option from one capture of the calibration statistics of
the unpruned model, predicts each distinct (option, site shapes) once, and runs the original on
the scoring sets once (as many as :data:`REFERENCE_BYTES` of its outputs hold). Its results are
cached by (model fingerprint, spec, target, workload, budget, seed, the profile's rates,
calibration data), so a re-plan is fast. Deterministic for a seed. :class:`AutoPlan` carries every option considered, with its
predicted saving, measured use and why it was chosen or rejected (``--explain``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sparsec.errors import SparsecError

SAFETY = 0.7  # the summed budget use the greedy choice first stays under
AIM = 0.85  # the share of the budget a rescaled choice aims to use end to end
# Options are scored on inputs split from the calibration data, and fidelity moves more on other
# inputs: SmolLM2's plan used 81% of a 1.2x perplexity budget on its scoring windows and 100.04%
# on held-out text (benchmarks/results/planner_smollm2_cpu.log); MiniLM's int8 + heads plan at
# --min-cosine 0.98 used 79% on its scoring sentences and 102% on held-out ones (docs/planner.md).
# So a combination may use at most this share of any budget on the scoring inputs.
CEILING = 0.75
FFN_RATIOS = (0.25, 0.5, 0.75)
HEAD_RATIOS = (0.25, 0.5)
MOE_KS = (4, 2)
MAX_RETRIES = 4
MAX_SITES = 12  # a family with more sites is planned per group of consecutive sites ...
GROUPS = 6  # ... this many groups
REFERENCE_BYTES = 512 << 20  # the reference outputs kept to score options on (whole input sets)


@dataclass
class Option:
    site: str
    family: str  # the pass
    spec: str
    form: str
    saving: float | None = None  # predicted seconds saved on the workload
    use: float | None = None  # share of the fidelity budget spent, measured alone
    status: str = "considered"  # chosen | rejected | considered
    reason: str = ""
    signature: tuple = field(default=(), repr=False)  # the site's shapes (savings are shared by equal ones)

    @property
    def shape_key(self) -> str:
        """The option without its site: options with equal keys and signatures save the same."""
        return f"{self.spec.split(',include=')[0]}|{self.signature}"

    @property
    def value(self) -> float:
        return (self.saving or 0.0) / max(self.use or 0.0, 1e-3)


def amount(value: float, objective: str) -> str:
    """A saving or a total in the objective's unit: seconds (latency) or bytes (size, memory)."""
    return f"{value * 1e3:.2f} ms" if objective == "latency" else f"{value / 2**20:.2f} MiB"


@dataclass
class AutoPlan:
    target: str
    budget: str
    options: list[Option]
    specs: list[str]
    predicted_seconds: float  # the objective's predicted value: seconds for latency, bytes for size / memory
    original_seconds: float  # the same for the original
    profile: str
    notes: list[str] = field(default_factory=list)
    objective: str = "latency"

    @property
    def predicted_speedup(self) -> float:
        """The original's value over the plan's: a speedup, or how many times smaller."""
        return self.original_seconds / self.predicted_seconds if self.predicted_seconds else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "options"},
                "predicted_speedup": self.predicted_speedup,
                "options": [{k: v for k, v in asdict(o).items() if k != "signature"} for o in self.options]}

    def lines(self) -> list[str]:
        if self.objective == "latency":
            gain = f"predicted {self.predicted_speedup:.2f}x on the workload ({self.profile})"
        else:
            gain = (f"objective {self.objective}: predicted {amount(self.predicted_seconds, self.objective)} of"
                    f" {amount(self.original_seconds, self.objective)} ({self.predicted_speedup:.2f}x smaller)")
        out = [f"planner for '{self.target}' under {self.budget}: {len(self.specs)} rewrite(s) chosen, {gain}"]
        for site in dict.fromkeys(o.site for o in self.options):
            out.append(f"  {site}")
            for o in (o for o in self.options if o.site == site):
                saving = f"saves {amount(o.saving, self.objective)}" if o.saving is not None else "-"
                use = f"uses {o.use:.0%} of the budget" if o.use is not None else "-"
                out.append(f"    {o.status:<9} {o.spec:<58} {saving:<17} {use:<26} {o.reason}")
        out.extend(f"  note: {n}" for n in self.notes)
        return out


def budget_use(verdict, budget) -> float:
    """How much of ``budget`` a candidate spends: the largest share over its criteria (1: all)."""
    uses = []
    if budget.min_cosine is not None:
        uses.append(max((1 - o.cosine) for o in verdict.outputs) / max(1 - budget.min_cosine, 1e-9))
    if budget.min_embedding_cosine is not None and "embedding_cosine_mean" in verdict.metrics:
        uses.append((1 - verdict.metrics["embedding_cosine_mean"]) / max(1 - budget.min_embedding_cosine, 1e-9))
    if budget.max_ppl_ratio is not None and "perplexity_ratio" in verdict.metrics:
        uses.append((verdict.metrics["perplexity_ratio"] - 1) / max(budget.max_ppl_ratio - 1, 1e-9))
    if budget.max_rel_err is not None:
        uses.append(max(o.rel_l2 for o in verdict.outputs) / max(budget.max_rel_err, 1e-12))
    return max(max(uses), 0.0) if uses else 0.0


def _cache_file(key: str) -> Path:
    root = Path(os.environ.get("SPARSEC_CACHE") or Path.home() / ".cache" / "sparsec") / "plans"
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


@dataclass
class Site:
    """A site the planner chooses for: one region, or a group of consecutive ones (deep models)."""

    label: str
    include: str  # the include patterns that select exactly these regions
    signature: tuple  # the shapes of its tensors: equal signatures, equal predicted savings
    regions: list = field(default_factory=list)


def _group(family: str, regions: list) -> list[Site]:
    def site(part):
        label = part[0].label if len(part) == 1 else f"{part[0].label} .. {part[-1].label} ({len(part)} {family} sites)"
        signature = tuple(tuple((t.ref.shape, t.axis) for t in r.tensors()) for r in part if hasattr(r, "tensors"))
        return Site(label, "|".join(_glob(r.label) for r in part), signature, list(part))

    if len(regions) <= MAX_SITES:
        return [site([r]) for r in regions]
    size = -(-len(regions) // GROUPS)
    return [site(regions[i:i + size]) for i in range(0, len(regions), size)]


def _sites(model, ctx) -> dict[str, list[Site]]:
    """The sites of each family (from the passes' own matchers), grouped on deep models."""
    from sparsec.pipeline import parse_pass_specs

    out = {}
    for family in ("ffn-neurons", "attention-heads", "attention"):
        (p,) = parse_pass_specs(family)
        record = p.new_record()
        try:
            regions = p.match(model, ctx, record)
        except SparsecError:  # a family that cannot even match this model offers nothing
            regions = []
        out[family] = _group(family, [r for r in regions if getattr(r, "lowering", "gqa") != "mask"])
    return out


def _glob(label: str) -> str:
    return label.replace("[", "?").replace("]", "?")


QUANTIZE_SITE = "weights of MatMul / Gemm (all): ONNX Runtime quantization"


def candidate_options(model, ctx, target, sites: dict[str, list[Site]] | None = None,
                      objective: str = "latency") -> list[Option]:
    """Every option of every site; for latency, the ones the target cannot accelerate already rejected."""
    from sparsec.cost import QUANTIZED_FORMS
    from sparsec.targets import MOE, STRUCTURED

    sites = sites if sites is not None else _sites(model, ctx)
    options = []
    for site in sites["ffn-neurons"]:
        options += [Option(site.label, "ffn-neurons", f"ffn-neurons:ratio={r},include={site.include}", STRUCTURED,
                           signature=site.signature) for r in FFN_RATIOS]
        options += [Option(site.label, "moe", f"moe:experts=8,k={k},include={site.include}", MOE,
                           signature=site.signature) for k in MOE_KS]
    for site in sites["attention-heads"]:
        options += [Option(site.label, "attention-heads", f"attention-heads:ratio={r},include={site.include}",
                           STRUCTURED, signature=site.signature) for r in HEAD_RATIOS]
    if sites["attention"]:
        options.append(Option("attention blocks (all)", "attention", "attention", "none"))
    # ONNX Runtime's own quantization of the whole model, composed with the rest
    options += [Option(QUANTIZE_SITE, "quantize", spec, form) for form, spec in QUANTIZED_FORMS.items()]
    for o in options:
        if objective == "latency" and o.form != "none" and not target.gain(o.form).speedup:
            o.status, o.reason = "rejected", f"no kernel on '{target.name}' turns {o.form} into speed"
    return options


def split(calibration):
    """(the sets passes fit on, the sets options are scored on): a quarter of the calibration
    sets (at least one) is kept out of the fitting -- a pass fitted on the inputs it is scored on
    (activation scores, least-squares refits) looks far better there than on any other text."""
    import dataclasses

    feeds = list(calibration.feeds)
    if len(feeds) < 2:
        return calibration, feeds
    held = max(1, len(feeds) // 4)
    fit = dataclasses.replace(calibration, feeds=feeds[:-held], source=f"{calibration.source} (all but the last"
                              f" {held} of {len(feeds)} input sets; those score the planner's options)")
    return fit, feeds[-held:]


def plan(source: str | os.PathLike, target, budget, *, calibration, scoring: list, workload: dict[str, np.ndarray],
         metrics: Callable[[], list] = lambda: [], seed: int = 0, runner=None, progress=None,
         fingerprint: str = "", objective: str = "latency", engine=None) -> AutoPlan:
    """Choose the rewrites for the model at ``source`` (see the module's description): passes fit
    on ``calibration``, options are scored on ``scoring`` (input sets kept out of the fitting).
    Each option alone is a unit of ``engine`` (:mod:`sparsec.engine`; default in this process)."""
    from sparsec.passes.moe import DENSE_CAPTURES, dense_captures
    from sparsec.passes.structured_prune import DENSE_STATISTICS, dense_statistics
    from sparsec.cost import load_profile
    from sparsec.engine import as_engine
    from sparsec.model_io import load_model
    from sparsec.pipeline import PassContext
    from sparsec.progress import silent
    from sparsec.verify import reference_outputs

    progress = progress or silent()
    profile = load_profile(target)
    ctx = PassContext(target=target, calibration=calibration, seed=seed, runner=runner)
    original = load_model(source).model
    sites = _sites(original, ctx)
    options = candidate_options(original, ctx, target, sites, objective)
    notes = [] if "measured" in profile.source or objective != "latency" else [f"cost model: {profile.source}"]
    grouped = [f for f, found in sites.items() if found and len(found[0].regions) > 1]
    if grouped:
        notes.append(f"{', '.join(grouped)}: more than {MAX_SITES} sites, so options are per group of consecutive sites")
    with progress.task(f"predicting the original's {objective}"):
        base = objective_value(source, workload, profile, objective)
    if not scoring:
        notes.append("no input sets kept out of the calibration: options are scored on the workload input")
        scoring = [workload]
    workload_key = json.dumps({k: list(v.shape) for k, v in workload.items()}, sort_keys=True)
    todo = [o for o in options if o.status == "considered"]
    measure = f"{profile.source}|{profile.digest()}" if objective == "latency" else objective
    keys = {id(o): (f"{fingerprint}|{o.spec}|{target.name}|{workload_key}|{budget.describe()}|{seed}|{measure}"
                    f"|{calibration.source if calibration is not None else ''}|{len(scoring)}") for o in todo}
    fresh = [o for o in todo if not (fingerprint and _cache_file(keys[id(o)]).exists())]
    is_fresh = {id(o) for o in fresh}
    if fresh and calibration is not None and any(o.family in ("ffn-neurons", "attention-heads") for o in fresh):
        regions = [r for f in ("ffn-neurons", "attention-heads") for site in sites[f] for r in site.regions]
        with progress.task(f"capturing calibration statistics at {len(regions)} sites"):
            ctx.extras[DENSE_STATISTICS] = dense_statistics(original, regions, ctx)
    references: list = []
    if fresh:
        with progress.task("running the original on the scoring inputs"):
            references = reference_outputs(source, scoring, runner=runner, max_bytes=REFERENCE_BYTES)
        if len(references) < len(scoring):
            notes.append(f"options are scored on {len(references)} of the {len(scoring)} scoring input sets"
                         f" (the original's outputs on them are kept in memory, at most {REFERENCE_BYTES >> 20} MiB);"
                         " the chosen combination on all of them")
    savings: dict[str, float] = {}  # predicted saving by shape key: equal shapes, equal saving

    def remember(o: Option) -> None:
        """Cache what trying ``o`` found (an internal error is not: a fixed pass tries it again)."""
        if fingerprint:
            cached = _cache_file(keys[id(o)])
            cached.parent.mkdir(parents=True, exist_ok=True)
            part = cached.with_suffix(f".{os.getpid()}.part")  # whole or absent, with concurrent planners
            part.write_text(json.dumps({"saving": o.saving, "use": o.use, "status": o.status, "reason": o.reason}))
            os.replace(part, cached)
    engine = as_engine(engine)
    with tempfile.TemporaryDirectory(prefix="sparsec-plan-") as tmp:
        if calibration is not None and any(o.family == "moe" and needs_calibration(o.spec) for o in fresh):
            with progress.task("capturing every FFN's calibration activations for the MoE options"):
                ctx.extras[DENSE_CAPTURES] = dense_captures(original, ctx, tmp)
        shared = {"source": str(source), "target": target, "calibration": calibration, "seed": seed,
                  "runner": runner, "extras": dict(ctx.extras), "references": references, "scoring": scoring,
                  "workload": workload, "profile": profile, "metrics": metrics, "budget": budget, "base": base,
                  "objective": objective, "folder": tmp}
        for wave in _waves(todo):
            # Options of one wave are independent (other sites, or the same milder step of one);
            # they are evaluated as engine units and taken in the order of ``todo``, exactly as
            # if one after the other.
            units = [o for o in wave if id(o) in is_fresh and _milder_over(o, todo) is None]
            results = dict(zip(map(id, units), engine.map(
                score_option, [(todo.index(o), o.spec) for o in units], labels=[o.spec for o in units],
                what="planner option", shared=shared))) if units else {}
            for o in progress.track(wave, f"trying each option alone ({engine.name})", total=len(wave)):
                cached = _cache_file(keys[id(o)])
                if id(o) not in is_fresh:
                    data = json.loads(cached.read_text())
                    o.saving, o.use, o.reason = data["saving"], data["use"], data.get("reason", "")
                    o.status = data.get("status", o.status)
                elif savings.get(o.shape_key, 1.0) <= 0 and o.signature:
                    o.saving = savings[o.shape_key]  # the same option on a site of the same shapes: known
                    remember(o)  # (or a re-plan would run it again)
                elif (milder := _milder_over(o, todo)) is not None:
                    o.status, o.reason = "rejected", f"the milder {milder.spec.split(',include=')[0]} alone already" \
                                                     " spends more than the budget allows here"
                    continue
                else:
                    result = results[id(o)]
                    if "failed" in result:  # an option that cannot run is reported, not fatal
                        o.status, o.reason = "rejected", f"the pass failed here: {result['failed']}"
                        remember(o)
                        continue
                    if "internal" in result:  # a bug in a pass: reported as one, the other options go on
                        o.status, o.reason = "rejected", f"internal error in the pass ({result['internal']})"
                        notes.append(f"internal error while trying {o.spec.split(',include=')[0]} (a sparsec bug;"
                                     f" please report it with --debug's traceback): {result['internal']}")
                        continue
                    if result["saving"] is None:
                        o.status, o.reason = "rejected", "the pass changed nothing here"
                        remember(o)
                        continue
                    o.saving = savings.setdefault(o.shape_key, result["saving"]) if o.signature else result["saving"]
                    o.use = result["use"]
                    remember(o)
                if o.status != "considered":
                    continue
                if o.saving is None or o.saving <= 0:
                    o.status, o.reason = "rejected", ("the cost model predicts no gain on this target"
                                                      if objective == "latency" else f"the {objective} does not shrink")
                elif o.use > SAFETY:
                    o.status, o.reason = "rejected", "alone it spends more than the budget allows"
    choose(options, SAFETY)
    chosen = [o for o in options if o.status == "chosen"]
    return AutoPlan(target.name, budget.describe(), options, ordered_specs(chosen),
                    base - sum(o.saving for o in chosen), base, profile.source, notes, objective)


def objective_value(path, workload, profile, objective: str) -> float:
    """What the planner minimises for the model at ``path``: predicted seconds on ``workload``
    (latency), bytes of the file and its data (size), or bytes of weights plus peak activations
    on ``workload`` (memory; :func:`sparsec.cost.footprint`)."""
    from sparsec.cost import file_bytes, footprint, predict

    if objective == "latency":
        return predict(path, workload, profile).seconds
    if objective == "size":
        return float(file_bytes(path))
    return float(footprint(path, workload).memory_bytes)


def _waves(todo: list[Option]) -> list[list[Option]]:
    """``todo`` in waves: the k-th option of every (site, family) in wave k, each wave in the
    order of ``todo``. Whether an option is tried depends only on the milder options of its own
    site and family (:func:`_milder_over`), all in earlier waves; options with equal shape keys
    hold the same place in their families, so they share a wave."""
    place: dict[tuple[str, str], int] = {}
    waves: list[list[Option]] = []
    for o in todo:
        k = place.get((o.site, o.family), 0)
        place[(o.site, o.family)] = k + 1
        if k == len(waves):
            waves.append([])
        waves[k].append(o)
    return waves


def score_option(job: tuple[int, str], *, source: str, target, calibration, seed: int, runner, extras: dict,
                 references: list, scoring: list, workload, profile, metrics, budget, base: float,
                 objective: str, folder: str) -> dict[str, Any]:
    """One option alone (an engine unit): fitted on the calibration sets, its predicted saving
    (of ``objective``) and its budget use on the scoring sets. ``{"failed": why}`` when the pass
    cannot run here (a sparsec error), ``{"internal": what}`` on any other exception (a bug),
    ``{"saving": None}`` when it changed nothing."""
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, run_passes
    from sparsec.verify import verify_against

    i, spec = job
    ctx = PassContext(target=target, calibration=calibration, seed=seed, runner=runner, extras=dict(extras))
    model = load_model(source).model
    try:
        (record,) = run_passes(model, passes_for([spec], calibration), ctx)
    except SparsecError as exc:
        return {"failed": str(exc)}
    except Exception as exc:
        return {"internal": f"{type(exc).__name__}: {exc}"}
    if not record.changed:
        return {"saving": None}
    path = save_model(model, Path(folder) / f"option{i}.onnx", external_data=True)
    try:
        saving = base - objective_value(path, workload, profile, objective)
        verdict = verify_against(references, path, scoring, exact=False, metrics=metrics(), runner=runner,
                                 outputs=budget.reads_outputs)
    finally:
        for written in Path(folder).glob(f"option{i}.*"):  # a decoder's options would fill the disk
            written.unlink()
    return {"saving": saving, "use": budget_use(verdict, budget)}


def _milder_over(option: Option, options: list[Option]) -> Option | None:
    """An option of the same site and family that removes less (the ones before ``option``:
    lower ratios, more experts) and alone already spends more than :data:`SAFETY` of the budget;
    the harsher one is not tried. Removing more units of a site does not lose less."""
    for o in options:
        if o is option:
            return None
        if o.site == option.site and o.family == option.family and o.use is not None and o.use > SAFETY:
            return o
    return None


def choose(options: list[Option], limit: float = SAFETY) -> None:
    """Greedy: the best saving per budget use first, one option per site, summed use <= ``limit``."""
    spent, taken = 0.0, set()
    for o in options:
        if o.status == "chosen":
            o.status, o.reason = "considered", ""
    pool = sorted((o for o in options if o.status == "considered"), key=lambda o: (-o.value, o.spec))
    for o in pool:
        if o.site in taken:
            o.reason = "another option of this site saves more per unit of budget"
            continue
        if spent + o.use > limit:
            o.reason = f"the budget is spent ({spent:.0%} of it, measured alone, by better options)"
            continue
        o.status, o.reason = "chosen", f"the best saving per use left, for {o.use:.0%} of the budget"
        spent += o.use
        taken.add(o.site)


def drop_weakest(auto: AutoPlan) -> bool:
    """Reject the chosen option with the least saving per use (no other takes its place); False
    when nothing is left to drop."""
    chosen = [o for o in auto.options if o.status == "chosen"]
    if not chosen:
        return False
    weakest = min(chosen, key=lambda o: (o.value, o.spec))
    weakest.status, weakest.reason = "rejected", "dropped: the combination missed the budget end to end"
    _update(auto)
    return True


def _update(auto: AutoPlan) -> None:
    now = [o for o in auto.options if o.status == "chosen"]
    auto.specs = ordered_specs(now)
    auto.predicted_seconds = auto.original_seconds - sum(o.saving for o in now)


ORDER = ("attention-heads", "ffn-neurons", "moe", "attention", "quantize")


def ordered_specs(chosen: list[Option]) -> list[str]:
    """Structured removal first (it needs the original blocks), then MoE, then fusion, then
    quantization (integer codes no other pass rewrites)."""
    return [o.spec for o in sorted(chosen, key=lambda o: (ORDER.index(o.family), o.spec))]


def settle(auto: AutoPlan, source, target, budget, *, calibration, scoring: list, workload, metrics, seed: int = 0,
           runner=None, progress=None) -> None:
    """Measure the chosen combination end to end on the scoring inputs and adjust.

    Drops compound rather than add (or, between distant sites, partly cancel), so the sum of the
    options' uses that the greedy choice may spend is rescaled from what each combination really
    used, aiming at :data:`AIM` of the budget: down when it missed the budget, up when it left
    more than ``1 - AIM`` of it unused; at most :data:`MAX_RETRIES` times. A larger combination
    that misses the budget gives way to the last one within it; a combination still over the
    budget loses its weakest options one by one. The predicted objective is the combined model's."""
    from sparsec.cost import load_profile
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, run_passes
    from sparsec.progress import silent
    from sparsec.verify import verify_models

    progress = progress or silent()
    ctx = PassContext(target=target, calibration=calibration, seed=seed, runner=runner)
    feeds = list(scoring) or [workload]
    profile = load_profile(target)

    def measure() -> float:
        with tempfile.TemporaryDirectory(prefix="sparsec-settle-") as tmp, \
                progress.task(f"measuring the chosen combination ({len(auto.specs)} rewrites)"):
            model = load_model(source).model
            run_passes(model, passes_for(auto.specs, calibration), ctx)
            path = save_model(model, Path(tmp) / "combined.onnx", external_data=True)
            use = budget_use(verify_models(source, path, feeds, exact=False, metrics=metrics(), runner=runner),
                             budget)
            auto.predicted_seconds = objective_value(path, workload, profile, auto.objective)
        summed = sum(o.use for o in auto.options if o.status == "chosen")
        auto.notes.append(f"{len(auto.specs)} rewrites (alone {summed:.0%} of the budget in sum) use {use:.0%} of it"
                          " together on the scoring inputs")
        return use

    auto.notes.append(f"the combination may use at most {CEILING:.0%} of the budget on the scoring inputs, as"
                      " fidelity moves more on inputs other than the calibration data")
    adjust(auto, measure, CEILING)


def adjust(auto: AutoPlan, measure: Callable[[], float], ceiling: float = 1.0) -> None:
    """:func:`settle`'s search: ``measure()`` gives the budget use of the chosen combination
    (and sets its predicted latency); a combination is within the budget when it uses at most
    ``ceiling`` of it, and a rescaled choice aims at :data:`AIM` of the ceiling."""
    within = None  # the last combination within the budget: (statuses, predicted seconds)
    aim = AIM * ceiling
    for _ in range(MAX_RETRIES + 1):
        _update(auto)
        if not auto.specs:
            return
        use = measure()
        summed = sum(o.use for o in auto.options if o.status == "chosen")
        if use <= ceiling:
            within = ([(o.status, o.reason) for o in auto.options], auto.predicted_seconds)
            if use >= aim:
                return
        elif within is not None:  # grown past the budget
            break
        if summed <= 0:
            return
        before = [(o.status, o.reason) for o in auto.options]
        # less than the budget used: a larger limit (nothing used at all: every option that alone fits)
        choose(auto.options, summed * aim / max(use, 1e-9))
        now = [o.status for o in auto.options]
        if now == [status for status, _ in before]:
            break
        if "chosen" not in now:  # the limit left nothing: drop options one by one instead
            for o, (status, reason) in zip(auto.options, before):
                o.status, o.reason = status, reason
            break
    if within is not None and use > ceiling:  # growing overshot: back to the combination within it
        for o, (status, reason) in zip(auto.options, within[0]):
            o.status, o.reason = status, reason
        _update(auto)
        auto.predicted_seconds = within[1]
        auto.notes.append("the larger combination missed the budget; the last one within it is kept")
        return
    while use > ceiling and drop_weakest(auto) and auto.specs:
        use = measure()


def needs_calibration(spec: str) -> bool:
    from sparsec.pipeline import parse_pass_specs

    return any(p.needs_calibration() for p in parse_pass_specs(spec))


def passes_for(specs: list[str], calibration) -> list:
    """The passes of ``specs`` with the calibration-aware defaults when there is data."""
    from sparsec.pipeline import parse_pass_specs
    from sparsec.plan import _calibration_aware

    passes = parse_pass_specs(";".join(specs)) if specs else []
    return [_calibration_aware(p) for p in passes] if calibration is not None else passes
