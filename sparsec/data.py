"""Calibration and evaluation data: one interface for every source.

A :class:`DataSource` turns a model into input sets (a :class:`Calibration`): a ``.npz`` of
input sets (:class:`NpzSource`), a UTF-8 text file cut into token windows with a tokenizer the
user names (:class:`TextSource`), a user's callable (:class:`CallableSource`), or the example
models' built-in text (:class:`BuiltinSource`: the first half of ``pydoc_data.topics``, never
the half fidelity is measured on). :func:`calibration_source` turns what a user wrote
(``--calib``) into a source.

Evaluation data is what fidelity is measured on besides random inputs: real inputs and the
task metric of the model (held-out sentences for an encoder, held-out token windows for a
decoder). :func:`evaluation_data` finds it for the example models; other models have none
unless the caller gives some.

Nothing here knows a pass or the compiler; the compiler asks this module, and this module asks
the example-model registry (:mod:`sparsec.models`) only for models built from it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir

from sparsec.errors import InputError, OptionError
from sparsec.feeds import Feed, InputSpec, input_specs, load_feeds, random_feeds
from sparsec.metrics import Metric

# Defaults for text calibration: 32 windows of 512 tokens (the SparseGPT/Wanda papers use 128);
# sentence encoders get 512 sentences, about as many tokens (32 sentences, the old default, cost
# MiniLM's 2:4 SparseGPT 0.89 -> 0.85 embedding cosine and left the MoE and FFN refits underfed).
DEFAULT_SAMPLES = 32
DEFAULT_SENTENCES = 512
DEFAULT_SEQLEN = 512
BATCH_ROWS = 8  # windows stacked into one input set
LINE_BATCH = 16  # lines (sentences) padded into one input set
UNITS = ("windows", "lines")  # how a text file is cut into samples
EVAL_SETS = 4  # input sets of held-out text fidelity is measured on (as the example models)


@dataclass
class Calibration:
    """Input sets a calibration-aware pass runs the model on."""

    feeds: list[Feed]
    source: str
    tokens: int = 0

    def to_dict(self) -> dict:
        return {"source": self.source, "input_sets": len(self.feeds), "tokens": self.tokens}


class DataSource(Protocol):
    """Where calibration input sets come from."""

    def describe(self) -> str:
        """What the source is, for messages and reports."""

    def calibration(self, model: ir.Model, samples: int, seqlen: int) -> Calibration:
        """``samples`` input sets (or token windows of ``seqlen``) for ``model``."""


@dataclass(frozen=True)
class NpzSource:
    """Input sets stored in a ``.npz`` (keys: input names, or ``K/name`` for set K)."""

    path: Path

    def describe(self) -> str:
        return f"input sets from {self.path}"

    def calibration(self, model: ir.Model, samples: int, seqlen: int) -> Calibration:
        return Calibration(load_feeds(self.path, input_specs(model)), self.describe(), 0)


@dataclass(frozen=True)
class TextSource:
    """A UTF-8 text file, tokenized with the user's tokenizer: cut into token windows (``unit``
    windows: decoders), or one sample per non-empty line with the tokenizer's special tokens,
    padded into batches with an attention mask (``unit`` lines: sentence encoders)."""

    path: Path
    tokenizer: str
    unit: str = "windows"

    def describe(self) -> str:
        return f"{self.path} tokenized with {self.tokenizer}" + (", one sample per line" if self.unit == "lines" else "")

    @property
    def default_samples(self) -> int:
        return DEFAULT_SENTENCES if self.unit == "lines" else DEFAULT_SAMPLES

    def tokens(self) -> list:
        """The file tokenized: one id list per non-empty line (lines), or one id stream (windows).
        Cached while the file is unchanged (a compile reads it for calibration and for held-out
        fidelity); callers must not modify the result."""
        stat = self.path.stat()
        return _tokenized(self.path, (stat.st_mtime_ns, stat.st_size), self.tokenizer, self.unit)

    def calibration(self, model: ir.Model, samples: int, seqlen: int) -> Calibration:
        cut = line_calibration if self.unit == "lines" else text_calibration
        return cut(self.tokens(), input_specs(model), samples, seqlen, self.describe())

    def held_out(self, model: ir.Model, reserved: int, seqlen: int, sets: int = EVAL_SETS
                 ) -> tuple[EvaluationData | None, str]:
        """Real inputs from the end of the file, after the ``reserved`` samples calibration takes
        from its start, with the task metric the model's outputs allow; else None and why."""
        task, metrics = task_metrics(model)
        if task is None:
            return None, metrics
        specs, units = input_specs(model), self.tokens()
        if self.unit == "lines":
            need = sets * LINE_BATCH
            if len(units) < reserved + need:
                return None, (f"{len(units)} lines, {reserved} to calibrate on and {need} to measure fidelity"
                              " on are needed")
            feeds = line_calibration(units[len(units) - need:], specs, need, seqlen, str(self.path)).feeds
            what = f"the last {need} lines"
        else:
            need = sets * seqlen
            if len(units) < (reserved + sets) * seqlen:
                return None, (f"{len(units)} tokens, {reserved} + {sets} windows of {seqlen} are needed to"
                              " calibrate and to measure fidelity")
            windows = np.asarray(units[len(units) - need:], np.int64).reshape(sets, 1, seqlen)
            feeds = [_text_feed(specs, w, np.ones(w.shape, np.int64), str(self.path)) for w in windows]
            what = f"the last {sets} windows of {seqlen} tokens"
        note = f"{what} of {self.path.name} (held out: calibration reads the first {reserved})"
        return EvaluationData(feeds, note, metrics, task), note


@functools.lru_cache(maxsize=4)
def _tokenized(path: Path, stamp: tuple[int, int], tokenizer: str, unit: str) -> list:
    """:meth:`TextSource.tokens`, keyed by the file's modification time and size."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--calib {path}: not UTF-8 text (calibration data is a .npz of input"
                         " sets, a UTF-8 text file with --tokenizer, or 'builtin')") from None
    if unit == "lines":
        encode = load_tokenizer(tokenizer, special_tokens=True)
        return [encode(line.strip()) for line in text.splitlines() if line.strip()]
    return load_tokenizer(tokenizer)(text)


@dataclass(frozen=True)
class CallableSource:
    """A user's function ``(model, samples, seqlen) -> list of input dicts``."""

    fn: Callable[[ir.Model, int, int], Sequence[dict[str, np.ndarray]]]
    note: str = "input sets from a user function"

    def describe(self) -> str:
        return self.note

    def calibration(self, model: ir.Model, samples: int, seqlen: int) -> Calibration:
        feeds = [dict(f) for f in self.fn(model, samples, seqlen)]
        if not feeds:
            raise InputError(f"{self.note}: returned no input sets")
        names = {s.name for s in input_specs(model)}
        for feed in feeds:
            missing = sorted(names - set(feed))
            if missing:
                raise InputError(f"{self.note}: an input set has no array for input '{missing[0]}'")
        return Calibration(feeds, self.note, 0)


@dataclass(frozen=True)
class BuiltinSource:
    """The example models' calibration text (first half of ``pydoc_data.topics``)."""

    def describe(self) -> str:
        return "built-in calibration text of the example models"

    @staticmethod
    def samples_for(model: ir.Model) -> int:
        """Sentences for an encoder, windows otherwise (about the same number of tokens)."""
        from sparsec.models import entry_for

        entry = entry_for(model.metadata_props)
        return DEFAULT_SENTENCES if entry is not None and entry.kind == "encoder" else DEFAULT_SAMPLES

    def calibration(self, model: ir.Model, samples: int, seqlen: int) -> Calibration:
        from sparsec.models import entry_for

        entry = entry_for(model.metadata_props)
        if entry is None or entry.calib_inputs is None:
            raise InputError("--calib builtin works for the example models only; give a .npz of"
                             " input sets or a text file with --tokenizer")
        feeds, tokens = entry.calib_inputs(samples, seqlen)
        return Calibration(feeds, f"built-in calibration text of '{entry.name}' ({entry.calib_note})", tokens)


CALIB_KINDS = "a .npz of input sets, a UTF-8 text file with --tokenizer, or 'builtin' for the example models"


def _example_entry(model: ir.Model, what: str, notes: list[str] | None):
    """The example-model entry ``model`` was exported from, when its resources are installed
    (else None, and a note saying what is missing)."""
    from sparsec.models import entry_for

    entry = entry_for(model.metadata_props)
    if entry is None:
        return None
    try:
        entry.check_resources()
    except InputError as exc:
        if notes is not None:
            notes.append(f"the model was exported from the example '{entry.name}', but its {what} is not"
                         f" available here ({exc}); it is compiled as any other model")
        return None
    return entry


def has_builtin_data(model: ir.Model, notes: list[str] | None = None) -> bool:
    """True when ``model`` is an example model whose built-in calibration text is available."""
    entry = _example_entry(model, "calibration text", notes)
    return entry is not None and entry.calib_inputs is not None


def default_samples(source: DataSource, model: ir.Model) -> int:
    """How many samples ``source`` gives ``model`` when the user names no number."""
    if isinstance(source, BuiltinSource):
        return source.samples_for(model)
    return getattr(source, "default_samples", DEFAULT_SAMPLES)


def calibration_source(spec: str | os.PathLike | DataSource | Callable | None, model: ir.Model, *,
                       tokenizer: str | None = None, unit: str | None = None,
                       needed_by: str = "a calibration-aware method") -> DataSource:
    """The source ``spec`` names; None means the example model's built-in text when there is one.

    Raises:
        OptionError: no source given and none built in.
        InputError: the file does not exist or is not a kind of calibration data.
    """
    if spec is None:
        if not has_builtin_data(model):
            raise OptionError(f"{needed_by} needs calibration data: give --calib with {CALIB_KINDS}")
        return BuiltinSource()
    if isinstance(spec, (NpzSource, TextSource, CallableSource, BuiltinSource)):
        return spec
    if callable(spec):
        return CallableSource(spec)
    if str(spec) == "builtin":
        return BuiltinSource()
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--calib {spec}: no such file (calibration data is {CALIB_KINDS})")
    if path.suffix == ".npz":
        return NpzSource(path)
    head = path.read_bytes()[:4096]
    if path.suffix == ".onnx" or b"\0" in head:
        raise InputError(f"--calib {spec}: not calibration data (it is {'an ONNX model' if path.suffix == '.onnx' else 'a binary file'});"
                         f" calibration data is {CALIB_KINDS}")
    if tokenizer is None:
        raise InputError(f"--calib {spec}: a text file needs --tokenizer (a tokenizer folder or tokenizer.json)")
    return TextSource(path, tokenizer, unit or "windows")


def load_calibration(spec: str | os.PathLike | DataSource | Callable | None, model: ir.Model, *,
                     samples: int | None = None, seqlen: int | None = None,
                     tokenizer: str | None = None, unit: str | None = None) -> Calibration:
    """Calibration input sets for ``model`` from ``spec`` (see :func:`calibration_source`)."""
    source = calibration_source(spec, model, tokenizer=tokenizer, unit=unit)
    return source.calibration(model, samples or default_samples(source, model), seqlen or DEFAULT_SEQLEN)


def _id_input(specs: Sequence[InputSpec], source: str) -> InputSpec:
    id_inputs = [s for s in specs if "input_ids" in s.name] or [s for s in specs if s.fill == "randint"]
    if len(id_inputs) != 1:
        raise InputError(f"{source}: cannot tell which model input takes token ids"
                         f" (inputs: {', '.join(s.name for s in specs)}); give a .npz instead")
    return id_inputs[0]


def _text_feed(specs: Sequence[InputSpec], ids: np.ndarray, mask: np.ndarray, source: str) -> Feed:
    """Every model input for a batch of token ids (rows x tokens) whose real tokens ``mask`` marks."""
    id_input, feed = _id_input(specs, source), {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if spec is id_input:
            feed[spec.name] = ids.astype(dtype)
        elif spec.fill == "ones":  # an attention mask
            feed[spec.name] = mask.astype(dtype)
        elif spec.fill == "zeros":
            feed[spec.name] = np.zeros(ids.shape, dtype)
        elif spec.fill == "arange":
            feed[spec.name] = np.broadcast_to(np.arange(ids.shape[1], dtype=dtype), ids.shape).copy()
        else:
            raise InputError(f"{source}: no rule to fill model input '{spec.name}' from text; give a .npz instead")
    return feed


def text_calibration(ids: Sequence[int], specs: Sequence[InputSpec], samples: int, seqlen: int,
                     source: str) -> Calibration:
    """Cut a token stream into ``samples`` windows and fill every model input for them."""
    need = samples * seqlen
    if len(ids) < need:
        raise InputError(f"{source}: {len(ids)} tokens, {samples} x {seqlen} = {need} needed;"
                         " use fewer --calib-samples or a shorter --calib-seqlen")
    _id_input(specs, source)
    windows = np.asarray(ids[:need], dtype=np.int64).reshape(samples, seqlen)
    feeds = [_text_feed(specs, rows, np.ones(rows.shape, np.int64), source)
             for rows in (windows[i:i + BATCH_ROWS] for i in range(0, samples, BATCH_ROWS))]
    return Calibration(feeds, source, need)


def line_calibration(lines: Sequence[Sequence[int]], specs: Sequence[InputSpec], samples: int, seqlen: int,
                     source: str) -> Calibration:
    """The first ``samples`` lines (token ids, each cut to ``seqlen``), padded into batches of
    :data:`LINE_BATCH` with zeros and an attention mask, as a sentence encoder is run."""
    if len(lines) < samples:
        raise InputError(f"{source}: {len(lines)} non-empty lines, {samples} needed; use fewer --calib-samples")
    _id_input(specs, source)
    feeds, tokens = [], 0
    for start in range(0, samples, LINE_BATCH):
        batch = [list(line[:seqlen]) for line in lines[start:min(start + LINE_BATCH, samples)]]
        width = max(len(line) for line in batch)
        ids = np.zeros((len(batch), width), np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for row, line in enumerate(batch):
            ids[row, :len(line)], mask[row, :len(line)] = line, 1
        feeds.append(_text_feed(specs, ids, mask, source))
        tokens += int(mask.sum())
    return Calibration(feeds, source, tokens)


def load_tokenizer(name: str, special_tokens: bool = False):
    """A callable text -> token ids, from a tokenizer folder or a tokenizer.json file (offline);
    with ``special_tokens``, the ids of one input as the model sees it ([CLS] ... [SEP])."""
    path = Path(name)
    try:
        if path.is_file() and path.suffix == ".json":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            tok.no_truncation()  # calibration text is cut into windows here, not by the tokenizer
            tok.no_padding()
            return lambda text: tok.encode(text, add_special_tokens=special_tokens).ids
        if path.is_dir():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            return lambda text: tok(text, add_special_tokens=special_tokens)["input_ids"]
    except ImportError as exc:
        raise InputError(f"--tokenizer {name}: needs the 'models' extra ({exc})") from None
    except Exception as exc:
        raise InputError(f"--tokenizer {name}: cannot load it ({str(exc).splitlines()[0][:200]})") from None
    raise InputError(f"--tokenizer {name}: not a tokenizer folder or tokenizer.json file")


@dataclass
class EvaluationData:
    """Real inputs to measure fidelity on, with the model's task metrics."""

    feeds: list[Feed]
    note: str
    metrics: Callable[[], list[Metric]] = field(default=lambda: [])
    task: str = ""  # encoder | decoder | "" (what the task metric measures)


def task_metrics(model: ir.Model) -> tuple[str | None, Callable[[], list[Metric]] | str]:
    """What the model's outputs say its task metric is: ("decoder", perplexity on a ``logits``
    output), ("encoder", mean-pooled embedding cosine of its first rank-3 output, with an attention
    mask input), or (None, why not)."""
    from sparsec.metrics import Perplexity, SentenceEmbeddingCosine

    specs = input_specs(model)
    ids = [s.name for s in specs if s.role == "ids"]
    masks = [s.name for s in specs if s.role == "mask"]
    if any(s.role == "past" for s in specs) or len(ids) != 1:
        return None, "it has no single token-id input without a KV cache"
    logits = [o.name for o in model.graph.outputs if "logits" in (o.name or "").lower()]
    if len(logits) == 1:
        return "decoder", lambda: [Perplexity(logits[0], ids[0])]
    hidden = [o.name for o in model.graph.outputs if o.shape is not None and len(o.shape) == 3]
    if masks and hidden:
        return "encoder", lambda: [SentenceEmbeddingCosine(hidden[0], masks[0])]
    return None, "no 'logits' output (decoder) and no rank-3 output with an attention mask (encoder)"


def evaluation_data(model: ir.Model, sets: int | None = None, notes: list[str] | None = None
                    ) -> EvaluationData | None:
    """Held-out real inputs and task metrics of an example model; None for other models (and
    for example models whose tokenizer is not installed: ``notes`` says so)."""
    entry = _example_entry(model, "evaluation text", notes)
    if entry is None or entry.real_inputs is None:
        return None
    return EvaluationData(entry.real_inputs(sets or entry.real_sets), entry.inputs_note,
                          entry.metrics or (lambda: []), entry.kind)


def timing_feed(model: ir.Model, *, seed: int = 0) -> tuple[Feed, str]:
    """The one input set speed is measured on: a real one when the model has some."""
    data = evaluation_data(model, 1)
    if data is not None:
        return data.feeds[0], data.note
    return random_feeds(input_specs(model), seed=seed, samples=1)[0], "random inputs"

