"""The model zoo: builders (not committed blobs) for the models tests, demo and benchmarks use.

Each entry exports a torch model with ``torch.onnx.export(..., dynamo=True)`` into a cache
directory (``$SPARSEC_CACHE`` or ``~/.cache/sparsec``), keyed by the builder's version and the
torch / transformers versions, and built atomically (a temporary directory renamed into
place). Exported models carry ``sparsec.zoo`` in their metadata, so ``compile`` can measure
their fidelity on real inputs (held-out text) with the right task metric.

Nothing is downloaded: real weights come from pip packages that ship them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparsec.errors import InputError, OptionError
from sparsec.metrics import Metric

ZOO_KEY = "sparsec.zoo"


@dataclass(frozen=True)
class ZooModel:
    """One buildable example model."""

    name: str
    description: str
    kind: str  # encoder | decoder | cnn
    real_weights: bool
    version: int  # bump when the builder's output changes
    builder: Callable[[Path], None]  # writes model.onnx (+ data) into the directory
    real_inputs: Callable[[int], list[dict[str, np.ndarray]]] | None = None  # arg: input sets
    metrics: Callable[[], list[Metric]] | None = None
    inputs_note: str = ""
    real_sets: int = 4  # real input sets compile measures fidelity on
    # Calibration input sets from the calibration half of the text: (samples, seqlen) ->
    # (input sets, tokens).
    calib_inputs: Callable[[int, int], tuple[list[dict[str, np.ndarray]], int]] | None = None
    calib_note: str = ""
    slow: bool = False
    needs: str = ""  # what to install when the builder's packages are missing
    needs_torch: bool = True
    # Raises InputError when what the real inputs and calibration text need (a tokenizer shipped
    # in a package) is missing; an exported model is still a model without it.
    resources: Callable[[], object] | None = None
    size: str = ""  # how big the export is on disk

    def check_resources(self) -> None:
        if self.resources is not None:
            self.resources()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "kind": self.kind,
                "real_weights": self.real_weights, "slow": self.slow, "size": self.size,
                "needs": self.needs or ("nothing beyond sparsec" if not self.needs_torch else "")}


_ENTRIES: dict[str, ZooModel] = {}


def register(entry: ZooModel) -> ZooModel:
    if entry.name in _ENTRIES:
        raise ValueError(f"duplicate zoo model '{entry.name}'")
    _ENTRIES[entry.name] = entry
    return entry


def quiet_transformers() -> None:
    """Silence transformers' warnings and progress bars (long texts are cut into windows here)."""
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:
        return
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()


def entries() -> dict[str, ZooModel]:
    from . import bert, cnn, large, llama, moe  # noqa: F401  (importing registers the entries)

    quiet_transformers()
    return dict(_ENTRIES)


def get(name: str) -> ZooModel:
    known = entries()
    if name not in known:
        raise OptionError(f"unknown example model '{name}' (known: {', '.join(sorted(known))})")
    return known[name]


def entry_for(metadata: dict[str, str]) -> ZooModel | None:
    """The zoo entry a model was built from, according to its metadata."""
    name = metadata.get(ZOO_KEY)
    return entries().get(name) if name else None


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEC_CACHE") or Path.home() / ".cache" / "sparsec")


def _cache_key(entry: ZooModel) -> str:
    if entry.needs_torch:
        import torch
        import transformers

        versions = f"{entry.version}|{torch.__version__}|{transformers.__version__}"
    else:
        versions = f"{entry.version}"
    return f"{entry.name}-{hashlib.sha256(versions.encode()).hexdigest()[:10]}"


def _require_packages(entry: ZooModel) -> None:
    try:
        import onnxscript  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise InputError(
            f"building the example model '{entry.name}' needs the 'models' extra"
            f" (pip install '.[models]' in a clone of sparsec): {exc}"
        ) from None


def build(name: str, *, cache_dir: str | os.PathLike | None = None, progress=None) -> Path:
    """Path of the exported model ``name``, exporting it first if it is not cached."""
    entry = get(name)
    if entry.needs_torch:
        _require_packages(entry)
    root = Path(cache_dir) if cache_dir else cache_root()
    final = root / "zoo" / _cache_key(entry)
    model_path = final / "model.onnx"
    if model_path.exists():
        return model_path
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        if progress is not None:
            with progress.task(f"exporting example model '{name}' (first use; cached after)"):
                entry.builder(tmp)
        else:
            entry.builder(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not model_path.exists():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_path


def export_torch(module, args: tuple, path: Path, *, zoo_name: str, input_names: list[str],
                 output_names: list[str], dynamic_shapes: Any) -> None:
    """Export ``module`` with torch.onnx dynamo and save it through sparsec's writer."""
    import logging

    import torch

    from sparsec.model_io import save_model

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes,
            input_names=input_names, output_names=output_names,
        )
    program.model.metadata_props[ZOO_KEY] = zoo_name
    save_model(program.model, path / "model.onnx", external_data=True)
