"""The pass framework: options schemas, the registry, records, and the pass manager.

A pass is a class with a stable kebab-case ``id``, a frozen-dataclass ``Options`` whose fields
carry their description, valid range and search space, the ``kinds`` it can be (its ``kind``
follows from its configured options: exact or lossy), a one-line ``matches``, a
``match(model, ctx, record)`` that finds the sites it would rewrite (recording every skipped
site with its code, rewriting nothing) and a ``run(model, ctx)`` that rewrites the model in
place and returns a ``PassRecord``. Passes keep no per-model state between runs: everything a
run needs comes in through ``ctx``.

Pass specs on the command line read ``id:key=value,key=value``; several passes are separated
by ``;`` and list values by ``|``, e.g. ``nm:n=2,m=4,include=*ffn*|*attn*``.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from sparsec.errors import OptionError, PassError
from sparsec.progress import Progress, silent


class Kind(str, enum.Enum):
    EXACT = "exact"  # outputs equal the original to fp tolerance
    LOSSY = "lossy"  # outputs change; fidelity is measured and reported


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None,
           min: float | None = None, max: float | None = None, search: Sequence[Any] | None = None,
           calibrated: Sequence[Any] | None = None, calibrated_default: Any = None) -> Any:
    """Declare one pass option.

    Args:
        default: the value when none is given.
        help: a one-line description (``sparsec passes``, docs/passes/).
        choices, min, max: the valid values.
        search: the values a planner or sweep may try (None: the option is not searched).
        calibrated: values for which the pass needs calibration data (a method such as wanda).
        calibrated_default: the value the plan takes instead of ``default`` when calibration
            data is available and the user did not set the option.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max,
            "search": tuple(search) if search else None,
            "calibrated": tuple(calibrated) if calibrated else None, "calibrated_default": calibrated_default}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PassOptions:
    """Base of every pass's options. Subclasses add fields made with :func:`option`."""

    def validate(self) -> None:
        """Cross-field checks; raise OptionError. Range and choice checks run before this."""


def _field_type(options_cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(options_cls)
    return hints[f.name]


def _coerce(pass_id: str, name: str, tp: Any, raw: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        items = raw.split("|") if isinstance(raw, str) else list(raw)
        return tuple(_coerce(pass_id, name, item_tp, item) for item in items if item != "")
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{pass_id}: option '{name}' expects true or false, got '{raw}'")
    if tp in (int, float, str):
        if tp is int and isinstance(raw, float) and not raw.is_integer():
            raise OptionError(f"{pass_id}: option '{name}' expects an integer, got '{raw}'")
        try:
            return tp(raw)
        except (TypeError, ValueError):
            raise OptionError(
                f"{pass_id}: option '{name}' expects {tp.__name__}, got '{raw}'"
            ) from None
    raise TypeError(f"unsupported option type {tp}")


def make_options(pass_cls: type[Pass], values: dict[str, Any]) -> PassOptions:
    """Build and validate a pass's options from raw (string or typed) values."""
    options_cls = pass_cls.Options
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise OptionError(
            f"{pass_cls.id}: unknown option '{unknown[0]}' (valid: {', '.join(fields)})"
        )
    typed = {}
    for name, raw in values.items():
        f = fields[name]
        value = _coerce(pass_cls.id, name, _field_type(options_cls, f), raw)
        meta = f.metadata
        checked = value if isinstance(value, tuple) else (value,)
        for item in checked:
            if meta.get("choices") and item not in meta["choices"]:
                raise OptionError(
                    f"{pass_cls.id}: option '{name}' must be one of"
                    f" {', '.join(map(str, meta['choices']))}; got '{item}'"
                )
            if meta.get("min") is not None and item < meta["min"]:
                raise OptionError(f"{pass_cls.id}: option '{name}' must be >= {meta['min']}; got {item}")
            if meta.get("max") is not None and item > meta["max"]:
                raise OptionError(f"{pass_cls.id}: option '{name}' must be <= {meta['max']}; got {item}")
        typed[name] = value
    options = options_cls(**typed)
    options.validate()
    return options


def options_dict(options: PassOptions) -> dict[str, Any]:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


@dataclass(frozen=True)
class OptionInfo:
    """One option as users and planners see it (``sparsec passes``, docs, search spaces)."""

    name: str
    default: Any
    help: str
    valid: str  # "one of a|b", "0.0..1.0" or ""
    search: tuple[Any, ...] | None

    def default_text(self) -> str:
        return "|".join(map(str, self.default)) if isinstance(self.default, tuple) else str(self.default)


def option_infos(pass_cls: type[Pass]) -> list[OptionInfo]:
    """The options of a pass, in declaration order: the one source of help, docs and recipes."""
    infos = []
    for f in dataclasses.fields(pass_cls.Options):
        meta = f.metadata
        if meta.get("choices"):
            valid = "one of " + "|".join(map(str, meta["choices"]))
        elif meta.get("min") is not None or meta.get("max") is not None:
            low = meta.get("min") if meta.get("min") is not None else ""
            high = meta.get("max") if meta.get("max") is not None else ""
            valid = f"{low}..{high}"
        else:
            valid = ""
        infos.append(OptionInfo(f.name, f.default, meta.get("help", ""), valid, meta.get("search")))
    return infos


def search_space(pass_cls: type[Pass]) -> dict[str, tuple[Any, ...]]:
    """The options a planner may vary, with the values it may try."""
    return {info.name: info.search for info in option_infos(pass_cls) if info.search}


@dataclass
class SiteRecord:
    """What a pass did at one site (a weight, a block): changed, unchanged or skipped."""

    site: str  # a readable label (module path, node or weight name)
    node: str
    action: str  # "changed" | "skipped"
    code: str = ""  # stable skip code (sparsec.passes.patterns.Code), e.g. NOT_DIVISIBLE; "" when changed
    message: str = ""
    at: str = ""  # the node on which the failing check looked, when not the site's node
    weight: str = ""
    shape: tuple[int, ...] = ()
    params: int = 0
    sparsity_before: float | None = None
    sparsity_after: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


# The floor of a rewrite that reorders fp32 sums: SmolLM2-135M's logits (30 layers) move by up
# to 2.2e-3 on random inputs and 9e-4 on real text when fused into GroupQueryAttention or MoE.
REORDER_TOLERANCE = (5e-3, 1e-3)


@dataclass
class PassRecord:
    """The result of one pass over one model: what matched, changed and was skipped, and why."""

    pass_id: str
    kind: str
    options: dict[str, Any]
    sites: list[SiteRecord] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    fidelity: dict[str, Any] | None = None  # filled when compile verifies after each pass
    extra: dict[str, Any] = field(default_factory=dict)  # pass-specific report data

    @property
    def changed(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.action == "changed"]

    @property
    def skipped(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.action == "skipped"]

    def skip_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(str(s.code) for s in self.skipped).items()))

    def skip(self, failure: Any, *, site: str = "", node: ir.Node | None = None, weight: str = "",
             shape: tuple[int, ...] = ()) -> None:
        """Record a skipped site from a :class:`~sparsec.passes.patterns.MatchFailure`: the one
        way every pass records a skip. ``node`` is the site's node (default: the failure's)."""
        from sparsec.graph import node_label

        anchor = node if node is not None else failure.node
        at = failure.node.name if failure.node is not None and failure.node is not anchor else ""
        self.sites.append(SiteRecord(
            site=site or (node_label(anchor) if anchor is not None else ""),
            node=(anchor.name or "") if anchor is not None else "", action="skipped",
            code=str(failure.code), message=failure.message, at=at or "", weight=weight, shape=tuple(shape)))

    @property
    def params_touched(self) -> int:
        return sum(s.params for s in self.changed)

    def sparsity(self) -> float | None:
        """Fraction of zeros over the weights this pass changed."""
        params = self.params_touched
        if not params:
            return None
        return sum(s.params * (s.sparsity_after or 0.0) for s in self.changed) / params

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_id,
            "kind": self.kind,
            "options": _jsonable(self.options),
            "candidates": len(self.sites),
            "changed": len(self.changed),
            "skipped": self.skip_counts(),
            "params_touched": self.params_touched,
            "sparsity": self.sparsity(),
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
            "fidelity": self.fidelity,
            **_jsonable(self.extra),
            "sites": [_jsonable(dataclasses.asdict(s)) for s in self.sites],
        }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


@dataclass
class PassContext:
    """What a pass may use besides the model. Built once per compile."""

    target: Any = None  # sparsec.targets.Target
    calibration: Any = None  # sparsec.data.Calibration, for calibration-aware passes
    seed: int = 0
    progress: Progress = field(default_factory=silent)
    runner: Any = None  # sparsec.runtime.session.Runner: how passes run the model (staged captures)
    extras: dict[str, Any] = field(default_factory=dict)
    engine: Any = None  # sparsec.engine.Engine for independent solves; None: in this process
    jobs: int = 1  # in this process, independent solves run at once in threads (same results)

    def __post_init__(self) -> None:
        if self.runner is None:
            from sparsec.runtime.session import cpu_runner

            self.runner = cpu_runner()


class Pass(abc.ABC):
    """Base class of every pass. Subclasses set the class attributes and implement ``run``
    (and ``match``, which ``run`` uses and ``sparsec match`` traces)."""

    id: ClassVar[str]
    summary: ClassVar[str]
    kinds: ClassVar[tuple[Kind, ...]]  # what the pass can be; ``kind`` says what it is as configured
    matches: ClassVar[str]
    Options: ClassVar[type[PassOptions]] = PassOptions
    # (atol, rtol) that float outputs are at least compared with after this pass, when its exact
    # rewrite computes the same sums in another order (a fused kernel): over a deep model the
    # drift exceeds the per-dtype defaults. None: the defaults; REORDER_TOLERANCE the usual floor.
    reorder_tolerance: ClassVar[tuple[float, float] | None] = None
    # Where the plan puts the pass (a stable sort): 0 for most; 1 for a pass that must see every
    # other pass's result (quantization turns float weights into integer codes that no other pass
    # rewrites); 2 for storage (compress packs the final weights, quantized ones included).
    order: ClassVar[int] = 0

    @property
    def kind(self) -> Kind:
        """Exact or lossy as configured (e.g. MoE with every expert active is exact)."""
        return self.kinds[0]

    def __init__(self, options: PassOptions | None = None, *, _explicit: frozenset[str] | None = None,
                 **values: Any) -> None:
        if options is not None and values:
            raise TypeError("give either an Options object or keyword values, not both")
        self.options = options if options is not None else make_options(type(self), values)
        # The options the user set: the plan may change the others (calibration-aware defaults).
        given = {f.name for f in dataclasses.fields(self.options)} if options is not None else set(values)
        self.explicit = frozenset(given if _explicit is None else _explicit)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"

    def spec(self) -> str:
        """This pass as a pass spec string, listing the options that differ from defaults."""
        defaults = self.Options()
        parts = []
        for name, value in options_dict(self.options).items():
            if value != getattr(defaults, name):
                text = "|".join(map(str, value)) if isinstance(value, tuple) else str(value)
                parts.append(f"{name}={text}")
        return self.id + (":" + ",".join(parts) if parts else "")

    def needs_calibration(self) -> bool:
        """True when this configured pass needs calibration data (ctx.calibration): some option
        holds a value its declaration marks ``calibrated``."""
        for f in dataclasses.fields(self.options):
            marked = f.metadata.get("calibrated")
            if marked and getattr(self.options, f.name) in marked:
                return True
        return False

    def sparse_form(self) -> str:
        """The sparse form this configured pass produces (a key of ``Target.gains``)."""
        return "none"

    def requires(self, model: ir.Model, ctx: PassContext) -> None:
        """Preconditions; raise PassError or OptionError when the pass cannot run."""

    def match(self, model: ir.Model, ctx: PassContext, record: PassRecord) -> list[Any]:
        """The sites this pass would rewrite, in graph order; every other candidate goes into
        ``record`` as skipped, with its code. Changes nothing. Each site has ``node`` and
        ``label``."""
        raise NotImplementedError(f"pass '{self.id}' has no matcher to trace")

    @abc.abstractmethod
    def run(self, model: ir.Model, ctx: PassContext) -> PassRecord:
        """Rewrite ``model`` in place and return what was done."""

    def new_record(self) -> PassRecord:
        return PassRecord(self.id, self.kind.value, options_dict(self.options))


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available under its id. A duplicate id is an error."""
    if not hasattr(cls, "id"):
        raise TypeError(f"{cls.__name__} must define 'id'")
    if cls.id in _REGISTRY and _REGISTRY[cls.id] is not cls:
        raise ValueError(f"duplicate pass id '{cls.id}' ({_REGISTRY[cls.id].__name__}, {cls.__name__})")
    for attr in ("summary", "kinds", "matches"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define '{attr}'")
    _REGISTRY[cls.id] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """All registered passes by id, sorted."""
    import sparsec.passes  # noqa: F401  (importing registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


def get_pass(pass_id: str) -> type[Pass]:
    passes = registry()
    if pass_id not in passes:
        raise OptionError(f"unknown pass '{pass_id}' (available: {', '.join(passes)})")
    return passes[pass_id]


def parse_pass_specs(text: str) -> list[Pass]:
    """Parse ``"nm:n=2,m=4;other"`` into configured pass objects."""
    passes: list[Pass] = []
    for chunk in text.split(";"):
        chunk = chunk.strip()
        if not chunk:
            continue
        pass_id, _, rest = chunk.partition(":")
        cls = get_pass(pass_id.strip())
        values: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise OptionError(f"{cls.id}: malformed option '{item}' (expected key=value)")
            if key.strip() in values:
                raise OptionError(f"{cls.id}: option '{key.strip()}' given twice")
            values[key.strip()] = raw.strip()
        passes.append(cls(**values))
    if not passes:
        raise OptionError(f"no pass in pass spec '{text}'")
    return passes


AfterPass = Callable[[Pass, PassRecord, ir.Model], None]


def run_passes(
    model: ir.Model,
    passes: Iterable[Pass],
    ctx: PassContext,
    *,
    after_each: AfterPass | None = None,
) -> list[PassRecord]:
    """Run ``passes`` in order on ``model`` (in place); return their records.

    ``after_each`` is called with the model after every pass (the compiler uses it to verify
    each pass against the original when asked).
    """
    records = []
    for p in passes:
        p.requires(model, ctx)
        start = time.perf_counter()
        try:
            record = p.run(model, ctx)
        except (OptionError, PassError):
            raise
        record.seconds = time.perf_counter() - start
        _check_provenance(p, record, model)
        if p.reorder_tolerance is not None and record.changed:
            _record_floor(model, p.reorder_tolerance)
        records.append(record)
        if after_each is not None:
            after_each(p, record, model)
    return records


def _record_floor(model: ir.Model, floor: tuple[float, float]) -> None:
    """Write into the model's metadata the tolerance floor its exact rewrites need (the
    largest so far), so that ``sparsec verify`` applies it later."""
    from sparsec.verify import TOLERANCE_FLOOR_KEY

    old = model.metadata_props.get(TOLERANCE_FLOOR_KEY)
    if old:
        floor = tuple(max(a, float(b)) for a, b in zip(floor, old.split(",")))  # type: ignore[assignment]
    model.metadata_props[TOLERANCE_FLOOR_KEY] = ",".join(f"{t:g}" for t in floor)


def _check_provenance(p: Pass, record: PassRecord, model: ir.Model) -> None:
    """Postcondition: every changed site's node carries the pass's provenance tag."""
    from sparsec.graph import PROVENANCE_PASS, all_nodes

    tagged = {n.name for n in all_nodes(model) if n.metadata_props.get(PROVENANCE_PASS) == p.id}
    missing = [s.node for s in record.changed if s.node not in tagged]
    if missing:
        raise PassError(f"pass '{p.id}' changed node '{missing[0]}' without a provenance tag")
