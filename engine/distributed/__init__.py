"""Scale-out on Ray Data: the two batch jobs, `engine.features` and `engine.score`, over a Ray cluster.

    python -m engine.features ... --ray [ADDRESS] [--ray-workers N]   # image batches on an actor pool
    python -m engine.score ... --ray [ADDRESS] [--ray-workers N]      # image shards and scoring units on one

`--ray` alone starts a local Ray instance (bounded: the CPUs the workers need, at most this machine's);
`--ray ADDRESS` joins a running cluster (`ray start --head` prints it: `HOST:6379`, or `auto`).
Needs the `ray` extra: `pip install 'bssan-engine[ray]'` (without it: one `error:` line saying so).

How it stays identical to one process (docs/ray.md): the work is cut into the single-process units
(engine.features' image batches; engine.score's image shards of whole IMAGE_BATCHes and its journal
units), each unit runs the same function on a worker (`map_batches` over an ActorPoolStrategy pool whose
actors each hold one loaded Extractor or Scorer), and the driver writes each unit's result where the
single-process run writes it: the store's memory maps listed in progress.json, the score journal's
units. So a unit is written atomically (flushed, then listed) by one writer, a rerun skips the listed
units, and the output files are byte-identical (tests/engine/test_ray.py). A worker killed mid-unit is
restarted by Ray (actor max_restarts -1, task retries -1: Ray Data's defaults, kept) and its unit
recomputed; a unit delivered twice is kept once, and a unit that never arrives is an error.

This module: connecting (`Cluster`), the actor (`UnitActor`) and `Cluster.run(worker, init, works)`,
the results of `worker.run(work)` for every work, in order. engine/distributed/features.py and
score.py hold the two jobs' workers; gallery.py the sharded, memory-mapped gallery and its exact
top-K merge. The engine imports Ray only here, lazily.

Test hook (like engine.files' BSSAN_KILL_AT_WRITE): BSSAN_RAY_KILL_UNIT=N:MARKER makes the worker that
receives unit N of a run SIGKILL itself, once (it creates MARKER first; a worker that finds MARKER goes on).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pickle
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

from engine.errors import BssanError, InputError

RAY_EXTRA = "pip install 'bssan-engine[ray]'"
LOCAL = "local"  # --ray without an address
KILL_UNIT_ENV = "BSSAN_RAY_KILL_UNIT"
CONNECT_TIMEOUT_S = 5.0  # the address is probed first: ray.init itself retries an unreachable GCS for minutes
MAX_BLOCKS = 4096  # input blocks of one run: one unit each up to this many (a retried task redoes one unit)


class RayUnavailableError(InputError):
    """--ray given, but Ray is not installed or the cluster cannot be reached."""


def check_ray(address: str) -> None:
    """Before any work: Ray importable, and ADDRESS (HOST:PORT, ray://HOST:PORT) accepting connections."""
    if importlib.util.find_spec("ray") is None:
        raise RayUnavailableError(f"--ray: Ray is not installed in {sys.prefix}; expected it for --ray (install it: {RAY_EXTRA})")
    if address in (LOCAL, "auto"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailableError(f"--ray {address}: expected HOST:PORT of a Ray head node (e.g. 10.0.0.5:6379), 'auto' or no address")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayUnavailableError(f"--ray {address}: cannot reach a Ray cluster there ({exc.strerror or type(exc).__name__}); "
                                  f"expected the address `ray start --head` printed, or no address for a local instance") from None


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayUnavailableError(f"--ray: cannot import Ray ({exc}); expected it for --ray (install it: {RAY_EXTRA})") from None
    return ray


def unwrap(exc: BaseException) -> BaseException:
    """The user error (BssanError) a worker raised, out of Ray's wrappers; else `exc` itself."""
    seen, stack = set(), [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BssanError):
            return current
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return exc


@dataclass
class Cluster:
    """A connected Ray (local or remote) and how its units are spread: `workers` actors of `cpus` CPUs (+ `gpus`)."""

    address: str
    workers: int
    cpus: float
    gpus: float

    @classmethod
    def connect(cls, address: str, threads: int, workers: int | None = None, want_gpu: bool = False) -> "Cluster":
        """Join ADDRESS (or start a local instance; reuse the one this process already joined). Each worker
        asks for `threads` CPUs (its graphs' intra-op threads) and, with `want_gpu` and GPUs there, one GPU."""
        check_ray(address)
        ray = _ray()
        if not ray.is_initialized():
            options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            if address == LOCAL:
                here = os.cpu_count() or 1
                cpus = here if workers is None else min(here, workers * threads)
                ray.init(address=LOCAL, num_cpus=max(cpus, threads), **options)
            else:
                try:
                    ray.init(address=address, **options)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise RayUnavailableError(f"--ray {address}: could not join the Ray cluster ({str(exc).splitlines()[0]}); "
                                              f"expected a running cluster of the same Ray version ({ray.__version__})") from None
        quiet()
        resources = ray.cluster_resources()
        gpus = 1.0 if want_gpu and resources.get("GPU", 0) >= 1 else 0.0
        fits = int(resources.get("CPU", 1) // threads) or 1
        if gpus:
            fits = min(fits, int(resources["GPU"]))
        chosen = min(workers, fits) if workers else fits
        if workers and workers > fits:
            print(f"note: --ray-workers {workers}: the cluster has room for {fits} workers of {threads} CPUs"
                  f"{' and 1 GPU' if gpus else ''}; using {fits}", file=sys.stderr)
        print(f"ray: {'local instance' if address == LOCAL else address}, {chosen} workers x {threads} CPUs"
              f"{' + 1 GPU' if gpus else ''} (cluster: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs)",
              file=sys.stderr)
        return cls(address, chosen, float(threads), gpus)

    def run(self, worker: type, init: dict, works: list, what: str) -> Iterator[object]:
        """`worker(**init).run(work)` for every work on the actor pool; results yielded in the order of `works`
        (each unit once; a unit computed twice after a retry is kept once). `init` is pickled with the actors'
        constructor: pass large arrays as ray.put references (ScorePool's caches), resolved by the worker."""
        if not works:
            return
        ray = _ray()
        items = [{"index": i, "work": json.dumps(work)} for i, work in enumerate(works)]
        kill = os.environ.get(KILL_UNIT_ENV)
        dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS)).map_batches(
            UnitActor, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=min(self.workers, len(items))),
            fn_constructor_kwargs={"worker": worker, "init": init, "kill": kill, "cwd": os.getcwd()},
            num_cpus=self.cpus, num_gpus=self.gpus)
        pending: dict[int, bytes] = {}
        done = 0
        try:
            for row in dataset.iter_rows():
                index = int(row["index"])
                if index >= done and index not in pending:
                    pending[index] = row["payload"]
                while done in pending:
                    yield pickle.loads(pending.pop(done))
                    done += 1
        except Exception as exc:  # noqa: BLE001  (Ray wraps a worker's error: re-raise the user's own, else keep Ray's)
            cause = unwrap(exc)
            if cause is exc:
                raise
            raise cause from None
        if done != len(works):
            raise RuntimeError(f"ray: {what}: {len(works) - done} of {len(works)} units never came back (first: {done}); "
                               f"rerun the same command to continue")


def quiet() -> None:
    """Ray Data's own progress bars and per-dataset log lines off: the job's tqdm bar is the progress."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # results stream back in unit order: bounded reorder buffer
    context.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.WARNING)


class UnitActor:
    """A Ray Data actor: builds one `worker(**init)` (a loaded Extractor or Scorer), then runs units, one
    per batch: {"index", "work": JSON} -> {"index", "payload": pickle of worker.run(work)}. It works in the
    driver's folder, so relative paths mean what they meant there (a cluster shares the paths: docs/ray.md)."""

    def __init__(self, worker: type, init: dict, kill: str | None, cwd: str):
        if os.path.isdir(cwd):
            os.chdir(cwd)
        self.worker = worker(**init)
        self.kill = kill

    def __call__(self, batch: dict) -> dict:
        payloads = []
        for index, work in zip(batch["index"].tolist(), batch["work"].tolist()):
            self._maybe_die(index)
            payloads.append(pickle.dumps(self.worker.run(json.loads(work)), protocol=pickle.HIGHEST_PROTOCOL))
        return {"index": batch["index"], "payload": payloads}

    def _maybe_die(self, index: int) -> None:
        if not self.kill:
            return
        unit, _, marker = self.kill.partition(":")
        if int(unit) == index and marker:
            with contextlib.suppress(FileExistsError):
                with open(marker, "x"):
                    pass
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9 of this worker, once


def shards(count: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive shards of `size` rows covering `count` rows."""
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def chunked(values: Iterable, size: int) -> list[list]:
    values = list(values)
    return [values[s:s + size] for s in range(0, len(values), size)]
