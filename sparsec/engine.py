"""Where independent units of work run: in this process (the default) or as Ray tasks.

``sparsec sweep`` (one compile per candidate), the planner (one fit-and-score per option),
``sparsec analyze`` (one layer's sensitivity) and the calibration-aware pruning passes (one
solve per site of a stage) hand their independent units to an :class:`Engine`:

* :class:`InProcess` runs them one after the other here: today's behaviour, and nothing
  imports ray.
* :class:`RayEngine` submits them as Ray tasks: ``--ray`` starts a local cluster for the
  command, ``--ray ADDRESS`` connects to an existing one (``ray start --head`` ...). Results
  come back in submission order, so a table is the same as the in-process one for the same
  seed. A task whose worker dies (killed, out of memory) is retried :data:`RETRIES` times by
  Ray; a task that raises, or dies more often, stops the command with one line naming the unit
  (:class:`TaskError`, or the unit's own error with its name in front): nothing is dropped.

A unit uses every core of a node unless told otherwise (torch, BLAS and ONNX Runtime threads
are the driver's; see :func:`thread_env`), so a Ray task reserves as many CPUs as the unit's
threads (:meth:`RayEngine.task_cpus`): with the defaults one unit runs per node at a time, and
limiting the threads (``OMP_NUM_THREADS=4`` and ``--threads 4``) runs a node's cores / 4 at
once. Tasks that reserved one CPU each and ran 16 threads, eight at once, oversubscribed a
16-core node eightfold: slower than the same compiles one after the other (docs/scale.md).

Timing must not share cores with anything else, or the speed ratios lie. A timing task asks
for one unit of the custom resource :data:`TIMING_RESOURCE`, of which each node has one, and
for as many CPUs as its ONNX Runtime threads: at most one timing task runs per node, and no
other sparsec task runs on the cores it uses. A local cluster gets the resource when it
starts; the nodes of an existing cluster must be started with
``ray start ... --resources='{"sparsec_timing": 1}'`` (the engine checks and says so).

Workers read the model and write candidates through the file system: every node must see the
paths the driver uses (one machine, or a shared mount).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sparsec.errors import EXIT_INTERNAL, OptionError, SparsecError, missing_package

TIMING_RESOURCE = "sparsec_timing"
RETRIES = 2  # Ray retries of a task whose worker died (not of one that raised)
LOCAL_OBJECT_STORE = 1 << 30  # object store of a local cluster: shared inputs and results only


class TaskError(SparsecError):
    """A unit of work failed unexpectedly (its worker died past the retries, or it hit a bug)."""

    exit_code = EXIT_INTERNAL


def _named(exc: BaseException, what: str, label: str, where: str) -> SparsecError:
    """``exc`` with the unit it came from in front; a sparsec error keeps its type and exit code."""
    text = " ".join(str(exc).split())
    if isinstance(exc, SparsecError):
        named = SparsecError.__new__(type(exc))
        SparsecError.__init__(named, f"{what} '{label}': {text}")
        named.__dict__.update(exc.__dict__)
        return named
    return TaskError(f"{what} '{label}' failed{where}: {type(exc).__name__}: {text[:300]}")


class Engine:
    """Runs independent units of work and returns their results in submission order."""

    name = "in-process"
    workers = 1  # units that may run at once

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *, labels: Sequence[str], what: str,
            shared: dict[str, Any] | None = None, num_gpus: float = 0, threads: int = 1) -> list[Any]:
        """``[fn(item, **shared) for item in items]``; ``fn`` must be a module-level function
        (Ray pickles it by reference). ``labels`` name the units in errors, ``what`` says what a
        unit is ("sweep candidate"). ``shared`` is sent once, not once per unit. ``num_gpus``: what
        a Ray task reserves besides the CPUs its threads use. ``threads``: in this process, up to
        this many units at once in a thread pool (for work that releases the GIL, such as torch's
        solves)."""
        raise NotImplementedError

    def timed(self, fn: Callable[..., Any], *args: Any, threads: int, label: str) -> Any:
        """``fn(*args)`` alone on a node's cores (see the module docstring)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine started."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcess(Engine):
    """Every unit here, one after the other."""

    def map(self, fn, items, *, labels, what, shared=None, num_gpus=0, threads=1):
        shared = shared or {}
        labels = list(labels)
        if len(labels) != len(items):
            raise ValueError(f"{len(items)} units but {len(labels)} labels")
        if threads <= 1 or len(items) <= 1:
            out = []
            for item, label in zip(items, labels):
                try:
                    out.append(fn(item, **shared))
                except Exception as exc:
                    raise _named(exc, what, label, "") from exc
            return out
        from concurrent.futures import ThreadPoolExecutor

        torch_threads = _torch_threads() if "torch" in sys.modules else None
        with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="sparsec") as pool:
            futures = [pool.submit(_call, fn, item, torch_threads, **shared) for item in items]
            out = []
            for future, label in zip(futures, labels):
                try:
                    out.append(future.result())
                except Exception as exc:
                    for f in futures:
                        f.cancel()
                    raise _named(exc, what, label, "") from exc
            return out

    def timed(self, fn, *args, threads, label):
        return fn(*args)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env() -> dict[str, str]:
    """The BLAS thread settings of this process, for Ray's workers: Ray sets OMP_NUM_THREADS to
    a task's CPUs, and numpy's BLAS sums in another order with another thread count, which
    moved the planner's measured budget use in the 9th digit. Unset here: BLAS's own default,
    one thread per CPU this process may use; OpenBLAS and MKL fall back to OMP_NUM_THREADS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    fallback = os.environ.get("OMP_NUM_THREADS") or str(cpus)
    return {name: os.environ.get(name) or fallback for name in THREAD_VARIABLES}


def _blas_threads() -> int:
    return max(int(v) if v.isdigit() else 1 for v in thread_env().values())


def _torch_threads() -> int | None:
    """This process's torch intra-op threads (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def _call(fn: Callable[..., Any], item: Any, torch_threads: int | None, **shared: Any) -> Any:
    # SparseGPT's float sums depend on torch's thread count (1 and 2 threads give different
    # bits), and Ray sets a worker's count to its task's CPUs: use the driver's.
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    return fn(item, **shared)


class RayEngine(Engine):
    """Units as Ray tasks, on a local cluster started here (``address`` None) or an existing one."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 threads: int | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise missing_package("ray", "--ray") from exc
        self._ray = ray
        self._started = False
        self.address = address
        if not ray.is_initialized():
            env = {"env_vars": thread_env()}
            if address is None:
                # Ray's memory monitor kills workers when the node is short of memory, whoever holds
                # it, and by default retries such tasks without end: as often as other deaths here.
                ray.init(num_cpus=num_cpus or os.cpu_count(), resources={TIMING_RESOURCE: 1},
                         object_store_memory=LOCAL_OBJECT_STORE, include_dashboard=False,
                         log_to_driver=False, configure_logging=False, runtime_env=env,
                         _system_config={"task_oom_retries": RETRIES})
            else:
                try:
                    ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=env)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise TaskError(f"cannot connect to the Ray cluster at '{address}': "
                                    f"{' '.join(str(exc).split())[:200]}") from None
            self._started = True
        resources = ray.cluster_resources()
        self.timing_slots = int(resources.get(TIMING_RESOURCE, 0))
        self.node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
        self.torch_threads = _torch_threads()
        self.threads = threads
        # units that may run at once: every task reserves the CPUs its threads use
        self.workers = max(1, int(resources.get("CPU", 1) // self.task_cpus()))
        self.name = (f"Ray ({'local cluster' if address is None else address}, {int(resources.get('CPU', 0))} CPUs,"
                     f" {self.workers} {'unit' if self.workers == 1 else 'units'} at once)")

    def task_cpus(self, num_gpus: float = 0) -> float:
        """The CPUs a unit's task reserves: as many as its busiest thread pool (torch's and BLAS's,
        the driver's counts; ONNX Runtime's, ``threads`` or else one per core of the node), at
        most a node's, so that units never share cores with each other. A unit with a GPU (a
        SparseGPT solve whose math runs on CUDA) reserves one: its work is on the GPU, and a
        node's GPUs each take one such task at once."""
        if num_gpus:
            return 1
        ort = self.threads or self.node_cpus
        return max(1, min(self.node_cpus, max(self.torch_threads or 1, _blas_threads(), ort)))

    def map(self, fn, items, *, labels, what, shared=None, num_gpus=0, threads=1):
        ray = self._ray
        remote = ray.remote(_call).options(num_cpus=self.task_cpus(num_gpus), num_gpus=num_gpus, max_retries=RETRIES,
                                           retry_exceptions=False)
        refs = {k: ray.put(v) for k, v in (shared or {}).items()}
        futures = [remote.remote(fn, item, self.torch_threads, **refs) for item in items]
        labels = list(labels)
        out = []
        try:
            for future, label in zip(futures, labels, strict=True):
                out.append(self._get(future, what, label))
        except BaseException:
            for future in futures:
                ray.cancel(future, force=True)
            raise
        return out

    def timed(self, fn, *args, threads, label):
        if not self.timing_slots:
            raise TaskError(f"{self.name} has no '{TIMING_RESOURCE}' resource, so timing"
                            " cannot be kept off other tasks' cores: start each node with ray start ..."
                            f" --resources='{{\"{TIMING_RESOURCE}\": 1}}'")
        # all the cores it times on, but no more than a node has (a task asking more never runs)
        remote = self._ray.remote(_call).options(num_cpus=min(threads, self.node_cpus),
                                                 resources={TIMING_RESOURCE: 1}, max_retries=RETRIES,
                                                 retry_exceptions=False)
        return self._get(remote.remote(_timed_call, (fn, args), self.torch_threads), "timing", label)

    def _get(self, future, what: str, label: str) -> Any:
        ray = self._ray
        try:
            return ray.get(future)
        except ray.exceptions.RayTaskError as exc:  # the task raised: its own exception
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise _named(cause, what, label, f" on {self.name}") from None
        except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory) past the retries
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise TaskError(f"{what} '{label}' failed on {self.name}: {type(exc).__name__} after {RETRIES}"
                            f" retries: {first[:200]}") from None

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def _timed_call(job: tuple[Callable[..., Any], tuple]) -> Any:
    fn, args = job
    return fn(*args)


def default_jobs() -> int:
    """Solves at once in this process: one per core, at most 8 (each also uses torch's threads)."""
    return max(1, min(8, os.cpu_count() or 1))


def make_engine(ray: str | bool | None = None, *, num_cpus: int | None = None,
                threads: int | None = None) -> Engine:
    """The engine for ``--ray``: None/False in-process, True (or "local") a local Ray cluster,
    an address an existing one. ``threads``: the ONNX Runtime threads of the command's units
    (``--threads``; None: one per core), which their tasks reserve as CPUs."""
    if ray is None or ray is False:
        return InProcess()
    address = None if ray is True or ray == "local" else str(ray)
    if address is not None and address != "auto" and ":" not in address:
        # ``--ray model.onnx`` reads the model as the address: say so rather than try to connect
        raise OptionError(f"--ray ADDRESS expects host:port, ray://host:port or auto, got '{address}'"
                          " (to start a local cluster give --ray after the other arguments, or --ray=local)")
    return RayEngine(address, num_cpus=num_cpus, threads=threads)


def as_engine(engine: Engine | None) -> Engine:
    return engine if engine is not None else InProcess()
