"""A corpus no one here wrote: ONNX's own backend test models, run through sparsec.

onnx 1.23 no longer ships the node test models on disk; ``load_node_model_tests()`` generates
them (model, input and expected output sets). They are written out as ``model.onnx`` +
``test_data_set_0/{input,output}_N.pb``, as older wheels had them, beside the simple,
pytorch-converted and pytorch-operator models the wheel still ships. Each model is then:

* compiled with ``--passes "nm:n=2,m=4,min_params=0,keep_output_layers=false"`` (most of these
  models are one op, whose weight feeds the output), the same with
  ``--constant-initializers`` (old exports list their weights as graph inputs) and with
  ``--passes compress`` (``--best-effort``: the point is whether sparsec handles the graph,
  not the budget),
* verified against itself (``sparsec verify MODEL MODEL``),

in-process through the CLI's ``main``. Outcomes are exit codes plus the one-line message.
``python -m tests.corpus [--all]`` runs it and prints the counts docs/reliability.md records.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

COMMANDS = {
    "nm": ["compile", "{model}", "--passes", "nm:n=2,m=4,min_params=0,keep_output_layers=false", "--best-effort", "-o", "{out}"],
    "compress": ["compile", "{model}", "--passes", "compress", "--best-effort", "-o", "{out}"],
    # Old exports list their weights as graph inputs: this one lets the pass rewrite them, so the
    # compile runs and verifies the rewritten model.
    "nm_constant": ["compile", "{model}", "--passes", "nm:n=2,m=4,min_params=0,keep_output_layers=false", "--constant-initializers",
                    "--best-effort", "-o", "{out}"],
    "verify": ["verify", "{model}", "{model}"],
}


COMPILES = ("nm", "nm_constant", "compress")


@dataclass
class Case:
    name: str  # e.g. node/test_abs, simple/test_gradient_of_add
    path: Path  # model.onnx
    inputs: Path | None  # a .npz of the stored test inputs (None when there are none)


@dataclass
class Outcome:
    name: str
    ort_runs: bool  # ONNX Runtime runs the model on its own stored inputs
    codes: dict[str, int] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    with_inputs: dict[str, int] = field(default_factory=dict)  # exit codes given the stored inputs
    unchanged: dict[str, bool] = field(default_factory=dict)  # compile changed nothing (not run)


def corpus_root() -> Path:
    import onnx

    from sparsec.models.zoo import cache_root

    return cache_root() / f"onnx-backend-corpus-{onnx.__version__}"


def _write_node_tests(root: Path) -> None:
    import onnx
    from onnx import numpy_helper
    from onnx.backend.test import loader

    with contextlib.redirect_stderr(io.StringIO()):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tests = loader.load_node_model_tests()
    for test in tests:
        folder = root / "node" / test.name
        folder.mkdir(parents=True, exist_ok=True)
        onnx.save(test.model, str(folder / "model.onnx"))
        if test.data_sets:
            inputs, outputs = test.data_sets[0]
            data = folder / "test_data_set_0"
            data.mkdir(exist_ok=True)
            try:
                for kind, values, infos in (("input", inputs, test.model.graph.input),
                                            ("output", outputs, test.model.graph.output)):
                    for i, (value, info) in enumerate(zip(values, infos)):
                        _write_value(data / f"{kind}_{i}.pb", value, info.name, numpy_helper)
            except (NotImplementedError, TypeError, ValueError):
                shutil.rmtree(data)  # a value no proto helper writes: the model stays, without data


def _write_value(path: Path, value, name: str, numpy_helper) -> None:
    import numpy as np
    import onnx

    if hasattr(value, "SerializeToString"):  # already a TensorProto / SequenceProto / ...
        path.write_bytes(value.SerializeToString())
        return
    if isinstance(value, list):
        proto = numpy_helper.from_list(value, name)
    elif isinstance(value, dict):
        proto = numpy_helper.from_dict(value, name)
    elif value is None:
        proto = onnx.OptionalProto(name=name, elem_type=onnx.OptionalProto.UNDEFINED)
    else:
        proto = numpy_helper.from_array(np.asarray(value), name)
    path.write_bytes(proto.SerializeToString())


def write_corpus() -> Path:
    """The corpus on disk (written once, then cached)."""
    import onnx.backend.test

    root = corpus_root()
    if (root / "DONE").exists():
        return root
    tmp = Path(tempfile.mkdtemp(prefix=".corpus-", dir=root.parent if root.parent.exists() else None))
    try:
        _write_node_tests(tmp)
        shipped = Path(onnx.backend.test.__file__).parent / "data"
        for family in ("simple", "pytorch-converted", "pytorch-operator"):
            if (shipped / family).is_dir():
                shutil.copytree(shipped / family, tmp / family)
        (tmp / "DONE").write_text("")
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _stored_inputs(folder: Path, out: Path) -> Path | None:
    """The test inputs of set 0 as a .npz (tensors only), or None."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    data = folder / "test_data_set_0"
    files = sorted(data.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1])) if data.is_dir() else []
    if not files:
        return None
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    arrays = {}
    for name, file in zip(names, files):
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(file.read_bytes())
            arrays[name] = numpy_helper.to_array(tensor)
        except Exception:
            return None  # a sequence, map or optional: not expressible in a .npz
    if len(arrays) != len(names):
        return None
    np.savez(out, **arrays)
    return out


def cases(root: Path, sample: int | None = None) -> list[Case]:
    """Every model of the corpus, or a deterministic sample of ``sample`` of them."""
    found = sorted(p.parent for p in root.glob("*/*/model.onnx"))
    if sample is not None:
        found = sorted(found, key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())[:sample]
        found.sort()
    return [Case(str(p.relative_to(root)), p / "model.onnx", None) for p in found]


def _ort_runs(model: Path, inputs: Path | None) -> bool:
    import numpy as np
    import onnxruntime as ort

    if inputs is None:
        return False
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        with np.load(inputs) as data:
            session.run(None, {k: data[k] for k in data.files})
        return True
    except Exception:
        return False


def _run_cli(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """(exit code, the last line on stderr, stdout)."""
    from sparsec.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        os.chdir(old)
    return code, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "", out.getvalue()


def run_case(case: Case) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="sparsec-corpus-") as tmp:
        tmp = Path(tmp)
        inputs = _stored_inputs(case.path.parent, tmp / "inputs.npz")
        outcome = Outcome(case.name, _ort_runs(case.path, inputs))
        for command, template in COMMANDS.items():
            args = [a.format(model=case.path, out=tmp / f"{command}.onnx") for a in template]
            outcome.codes[command], outcome.messages[command], out = _run_cli(args, tmp)
            if command != "verify":
                outcome.unchanged[command] = "no pass changed the model" in out
            if outcome.codes[command] == 2 and inputs is not None:
                again = [*args, "--inputs", str(inputs)]
                outcome.with_inputs[command], _, _ = _run_cli(again, tmp)
        return outcome


def summarize(outcomes: list[Outcome]) -> dict:
    runs = [o for o in outcomes if o.ort_runs]
    internal = [(o.name, c, o.messages[c]) for o in outcomes for c, code in o.codes.items() if code == 3]
    self_verify = [(o.name, o.messages["verify"]) for o in outcomes if o.codes.get("verify") == 1]
    refused = [o for o in runs if any(o.codes[c] == 2 for c in COMPILES)]
    compile_fails = [(o.name, c, o.messages[c]) for o in outcomes for c in COMPILES if o.codes[c] == 1]
    changed = {c: sum(1 for o in outcomes if o.codes[c] == 0 and not o.unchanged.get(c)) for c in COMPILES}
    return {
        "compiles_that_changed_and_verified": changed,
        "verify_refusals_of_runnable_models": [(o.name, o.messages["verify"]) for o in runs if o.codes["verify"] == 2],
        "models": len(outcomes), "ort_runs_with_stored_inputs": len(runs),
        "internal_errors": internal, "self_verification_failures": self_verify,
        "false_refusals": [(o.name, {c: o.messages[c] for c in COMPILES if o.codes[c] == 2},
                            o.with_inputs) for o in refused],
        "compile_verification_failures": compile_fails,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every model, not a sample of 60")
    parser.add_argument("--json", default=None, help="write the outcomes here")
    args = parser.parse_args()
    root = write_corpus()
    chosen = cases(root, None if args.all else 60)
    outcomes = []
    for i, case in enumerate(chosen):
        outcomes.append(run_case(case))
        if i % 50 == 0:
            print(f"{i}/{len(chosen)}", file=sys.stderr, flush=True)
    summary = summarize(outcomes)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "outcomes": [asdict(o) for o in outcomes]},
                                              indent=1, default=str))
    print(json.dumps({k: (v if isinstance(v, (int, dict)) else len(v)) for k, v in summary.items()}, indent=1))
    for key in ("internal_errors", "self_verification_failures", "false_refusals", "compile_verification_failures"):
        for item in summary[key][:40]:
            print(key, item)
