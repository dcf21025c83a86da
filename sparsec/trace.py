"""Trace a pass's matching: for every candidate site, whether it matched and, if not, which check
failed and on which node. Nothing is rewritten (``sparsec match MODEL --pass ID``).

As onnxscript's rewriter tracer does for its rules: users bringing a foreign export see at once
why a pass does nothing on their graph.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Any

import onnx_ir as ir

from sparsec.pipeline import Pass, PassContext, parse_pass_specs


@dataclass
class TraceRow:
    node: str  # the candidate's node
    site: str  # its readable label (module path, weight name)
    status: str  # MATCH or a skip code
    message: str = ""
    at: str = ""  # the node the failing check looked at, when not the candidate's
    meaning: str = ""  # the code's one-line meaning

    def line(self) -> str:
        where = f" (at node '{self.at}')" if self.at else ""
        text = f"{self.status:<16} {self.node:<32} {self.site}"
        if self.status != "MATCH":
            text += f"\n{'':16} {self.message}{where}"
        return text


@dataclass
class Trace:
    pass_spec: str
    rows: list[TraceRow]

    @property
    def matched(self) -> int:
        return sum(r.status == "MATCH" for r in self.rows)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (kv[0] != "MATCH", kv[0])))

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_spec, "matched": self.matched, "counts": self.counts(),
                "rows": [asdict(r) for r in self.rows]}


def trace(model: ir.Model, pass_spec: str | Pass, node: str | None = None) -> Trace:
    """Match one pass over ``model`` without rewriting; ``node`` keeps candidates whose node name
    or label matches that glob."""
    from sparsec.passes.patterns import Code

    p = pass_spec if isinstance(pass_spec, Pass) else _one_pass(pass_spec)
    record = p.new_record()
    sites = p.match(model, PassContext(), record)
    order = {n.name: i for i, n in enumerate(ir.traversal.RecursiveGraphIterator(model.graph))}
    rows = []
    for site in sites:
        anchor = site.node
        rows.append(TraceRow((anchor.name or "") if anchor is not None else "", site.label, "MATCH"))
    for skipped in record.skipped:
        code = Code(skipped.code) if skipped.code in Code.__members__ else None
        rows.append(TraceRow(skipped.node, skipped.site, skipped.code, skipped.message, skipped.at,
                             code.meaning if code is not None else ""))
    rows.sort(key=lambda r: (order.get(r.node, len(order)), r.status != "MATCH"))
    if node is not None:
        rows = [r for r in rows if fnmatch.fnmatchcase(r.node, node) or fnmatch.fnmatchcase(r.site, node)]
    return Trace(p.spec(), rows)


def _one_pass(spec: str) -> Pass:
    from sparsec.errors import OptionError

    passes = parse_pass_specs(spec)
    if len(passes) != 1:
        raise OptionError(f"--pass takes one pass spec, got {len(passes)} ('{spec}')")
    return passes[0]
