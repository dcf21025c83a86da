"""Sweep: candidates compiled best-effort, judged, timed side by side; the Pareto front."""

from sparsec.sweep import SweepPoint, mark_pareto, sweep
from tests.helpers import linear, save


def test_pareto_front():
    points = [SweepPoint("a", 1.0, 1.0, 10, 0), SweepPoint("b", 0.9, 1.5, 7, 0), SweepPoint("c", 0.8, 1.2, 8, 0),
              SweepPoint("d", 0.95, 1.5, 7, 0)]
    mark_pareto(points)
    assert [p.label for p in points if p.pareto] == ["a", "d"]  # b and c are dominated by d


def test_sweep_judges_every_candidate_and_times_them_together(tmp_path):
    model = save(linear(k=256, n=128), tmp_path / "m.onnx")
    result = sweep(model, ["compress", "nm:n=1,m=4,min_params=0"], repeats=5, threads=1, samples=1)
    original, packed, pruned = result.points
    assert original.label == "original" and original.speedup == 1.0 and original.verdict == ""
    assert packed.verdict == "EXACT" and packed.fidelity == 1.0  # nothing to pack in a dense model
    assert pruned.verdict == "BELOW BUDGET" and pruned.fidelity < 0.99  # measured although below budget
    assert pruned.speedup_p10 <= pruned.speedup <= pruned.speedup_p90 and result.repeats >= 5
    assert "| nm:n=1,m=4,min_params=0 | BELOW BUDGET |" in "\n".join(result.table())
