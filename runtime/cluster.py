"""Scale-out on Ray (DESIGN §6): a pool of worker actors that run chunks of independent work on a cluster.

A certification point depends only on the model, its image and id, and the run's settings, so points are
independent tasks. :class:`RayPool` keeps one actor per CPU of the cluster (or ``workers``); each actor
builds a backend from its :class:`~arqc.runtime.backends.BackendRecipe` once (the model bytes travel once per
worker, through Ray's object store, not once per chunk) and runs chunks against it. :meth:`RayPool.map`
yields the chunks' results in submission order while later chunks still run, so the driver alone writes
state files and JSON, in image order: a distributed run, a local run and a resumed run give the same file.

Faults: a worker process that dies is restarted by Ray and its chunks run again (they are deterministic,
so the result does not change); a driver that dies leaves the state file it wrote, which the same command
resumes. Ray is an optional extra (``pip install 'arqc[ray]'``); nothing here imports it until a pool opens.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from arqc.base import ArqcError
from arqc.runtime.backends import Backend, comparisons

# Packages whose versions decide the numbers a worker computes: every worker must have the driver's.
PACKAGES = ("arqc", "torch", "numpy", "scipy", "onnx", "onnxruntime")
CHUNK_SAMPLES = 20_000  # the default chunk holds about this many forward passes (seconds of one CPU)
CHUNKS_PER_WORKER = 4  # ... but a run is split into at least this many chunks per worker, for balance
RETRIES = 3  # a worker that dies is restarted, and its chunks run again, up to this many times


def ray_module():
    """The ray package, or a one-line ArqcError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ArqcError("Ray is not installed; install the extra with pip install 'arqc[ray]' (or drop --ray)") \
            from None
    return ray


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """The installed version of every package in ``names`` (None where it is missing)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class Worker:
    """One Ray actor: runs chunks against backends built from recipes, keeping the last few it built."""

    KEEP = 2  # backends kept per worker (the search moves from candidate to candidate)

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.threads, self.backends = threads, {}

    def ready(self, names: Sequence[str]) -> tuple[dict, str]:
        return package_versions(names), socket.gethostname()

    def pid(self) -> int:
        return os.getpid()

    def run(self, key: str, boxed_recipe: list, task: Callable[[Backend], Any]) -> tuple[Any, float, list]:
        """``task(backend)``, its seconds, and the (samples, disagreements) of the backend's comparisons."""
        backend = self.backends.get(key)
        if backend is None:
            import ray

            recipe = ray.get(boxed_recipe[0])  # fetched from the object store once per worker and model
            backend = recipe.build(self.threads)
            if len(self.backends) >= self.KEEP:
                self.backends.pop(next(iter(self.backends)))
            self.backends[key] = backend
        chain = comparisons(backend)
        for c in chain:
            c.samples = c.disagreements = 0
        start = time.perf_counter()
        out = task(backend)
        return out, time.perf_counter() - start, [(c.samples, c.disagreements) for c in chain]

    def call(self, fn: Callable, *args) -> Any:
        """A plain function call on the worker (work that needs no backend, e.g. a whole experiment row)."""
        return fn(*args)


@dataclass
class PoolStats:
    """What :meth:`RayPool.map` measured: chunks, the workers' compute seconds and the driver's wall seconds."""

    chunks: int = 0
    compute_s: float = 0.0  # inside the workers' tasks
    wall_s: float = 0.0  # from the first submission to the last result, on the driver
    waiting_s: float = 0.0  # of wall_s, the driver blocked waiting for results (the rest it was busy)


class RayPool:
    """Worker actors on a Ray cluster (see the module docstring). Open one with :func:`open_pool`."""

    def __init__(self, ray, workers: int | None, chunk: int | None, cpus_per_worker: int = 1,
                 packages: Sequence[str] = PACKAGES):
        self.ray, self.chunk = ray, chunk
        cpus = _free_cpus(ray, workers * cpus_per_worker if workers is not None else None)
        count = workers if workers is not None else cpus // cpus_per_worker
        if count < 1 or count * cpus_per_worker > cpus:
            raise ArqcError(f"the Ray cluster has {cpus} free CPUs; {max(count, 1)} workers of {cpus_per_worker} "
                            f"CPU need {max(count, 1) * cpus_per_worker}: add nodes or ask for fewer --ray-workers")
        actor = ray.remote(num_cpus=cpus_per_worker, max_restarts=RETRIES, max_task_retries=RETRIES)(Worker)
        self.actors = [actor.remote(cpus_per_worker) for _ in range(count)]
        self.stats = PoolStats()
        self._refs: dict[str, Any] = {}
        try:
            self._check_workers(packages)
        except ArqcError:
            self.close()  # a cluster this process did not start keeps running: free its CPUs
            raise

    def _check_workers(self, packages: Sequence[str]) -> None:
        """Refuse (one line) workers that cannot start arqc or have other package versions than this process."""
        mine = package_versions(packages)
        try:
            ready = self.ray.get([a.ready.remote(packages) for a in self.actors])
        except Exception as err:  # noqa: BLE001  the worker's exception, whatever it is
            reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
            raise ArqcError(f"Ray workers cannot start arqc ({reason}); install arqc and its packages on every "
                            "node of the cluster") from None
        for versions, host in ready:
            for name in packages:
                if versions.get(name) is None or versions.get(name) != mine[name]:
                    raise ArqcError(f"Ray worker on {host} has {name} {versions.get(name) or 'not installed'}, "
                                    f"this machine {mine[name]}; install the same versions on every node (a "
                                    "distributed run must compute what a local run does)")

    @property
    def workers(self) -> int:
        return len(self.actors)

    def chunks(self, items: Sequence, samples_per_item: int) -> list[Sequence]:
        """``items`` cut into chunks: ``chunk`` items each if set, else about CHUNK_SAMPLES forward passes,
        and at least CHUNKS_PER_WORKER chunks per worker while there are items enough."""
        size = self.chunk or max(1, min(math.ceil(CHUNK_SAMPLES / max(samples_per_item, 1)),
                                        math.ceil(len(items) / (CHUNKS_PER_WORKER * self.workers))))
        return [items[i : i + size] for i in range(0, len(items), size)]

    def map(self, backend: Backend | None, tasks: Sequence) -> Iterator[Any]:
        """Yield ``task(worker's copy of backend)`` for every task, in order, as they finish. With ``backend``
        None every task is a tuple (function, *args) and yields ``function(*args)``; arguments that are
        :meth:`put` references arrive as their values. Every worker keeps two chunks in flight; a chunk whose
        worker died runs again (Ray restarts the worker and retries its chunks up to RETRIES times). The
        comparisons of ``backend`` (ComparingBackend counts) add up the workers' counts."""
        ray = self.ray
        if backend is not None:
            recipe = backend.recipe()
            if recipe.key not in self._refs:
                self._refs = {recipe.key: ray.put(recipe)}  # the one model the workers fetch now
            box = [self._refs[recipe.key]]
        chain = comparisons(backend) if backend is not None else []
        todo = list(range(len(tasks)))[::-1]
        inflight: dict[Any, tuple[int, Any]] = {}  # ref -> (task, actor)
        done: dict[int, Any] = {}
        start, following = time.perf_counter(), 0

        def submit(actor) -> None:
            i = todo.pop()
            ref = (actor.run.remote(recipe.key, box, tasks[i]) if backend is not None
                   else actor.call.remote(*tasks[i]))
            inflight[ref] = (i, actor)

        for _ in range(2):
            for actor in self.actors:
                if todo:
                    submit(actor)
        try:
            while following < len(tasks):
                while following in done:
                    yield done.pop(following)
                    following += 1
                if following >= len(tasks):
                    break
                waited = time.perf_counter()
                ready, _ = ray.wait(list(inflight), num_returns=1)
                self.stats.waiting_s += time.perf_counter() - waited
                i, actor = inflight.pop(ready[0])
                try:
                    value = ray.get(ready[0])
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
                    raise ArqcError(f"a Ray worker died more than {RETRIES} times running chunk {i} "
                                    f"({type(err).__name__}); check the workers' memory and logs") from None
                except ray.exceptions.RayTaskError as err:
                    raise _task_error(err) from None
                if backend is not None:
                    value, seconds, counts = value
                    self.stats.compute_s += seconds
                    for c, (samples, disagreements) in zip(chain, counts, strict=True):
                        c.samples += samples
                        c.disagreements += disagreements
                self.stats.chunks += 1
                done[i] = value
                if todo:
                    submit(actor)
        finally:
            self.stats.wall_s += time.perf_counter() - start

    def put(self, value: Any) -> Any:
        """``value`` in the cluster's object store: a reference that :meth:`map` tasks take as an argument, so
        that the value travels once per node rather than once per task."""
        return self.ray.put(value)

    def pids(self) -> list[int]:
        """The worker processes' ids (tests kill one)."""
        return self.ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def run_in_chunks(backend: Backend, pool: RayPool | None, indices: list[int],
                  task: Callable[[list[int]], Callable[[Backend], list]], samples_per_item: int) -> Iterator:
    """The items of ``task(chunk)(backend)`` over ``indices``, in order: one index at a time here (``pool``
    None), or in the pool's chunks (:meth:`RayPool.chunks`) on its workers. ``task(chunk)`` must pickle (a
    functools.partial of a module-level function): what a local run and a distributed run both call."""
    if pool is None:
        return (item for i in indices for item in task([i])(backend))
    tasks = [task(chunk) for chunk in pool.chunks(indices, samples_per_item)]
    return (item for done in pool.map(backend, tasks) for item in done)


def _free_cpus(ray, wanted: int | None, wait_s: float = 10.0) -> int:
    """The cluster's free CPUs, once ``wanted`` of them (default: all) are free or after ``wait_s`` seconds (the
    CPUs of workers just closed come back after a moment); workers beyond the free CPUs would never start."""
    deadline = time.monotonic() + wait_s
    total = int(ray.cluster_resources().get("CPU", 0))
    while True:
        free = int(ray.available_resources().get("CPU", 0))
        if free >= min(total, wanted if wanted is not None else total) or time.monotonic() > deadline:
            return free  # (more than the cluster has is refused at once)
        time.sleep(0.1)


def _task_error(err) -> ArqcError:
    """A worker's exception as one line (an ArqcError raised on a worker keeps its message)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, ArqcError):
        return cause
    text = str(cause or err).strip().splitlines()
    return ArqcError(f"a Ray worker failed: {text[-1][:300] if text else type(err).__name__}")


@contextmanager
def open_pool(address: str, workers: int | None = None, chunk: int | None = None,
              packages: Sequence[str] = PACKAGES) -> Iterator[RayPool]:
    """A pool on the Ray cluster at ``address``: "auto" (the cluster this machine belongs to, from ``ray start``
    or RAY_ADDRESS), "local" (a Ray instance on this machine, started now) or HOST:PORT / ray://HOST:PORT.
    One-line ArqcErrors for an unreachable address and for workers without arqc's packages."""
    if workers is not None and workers < 1:
        raise ArqcError(f"--ray-workers must be at least 1, got {workers}")
    if chunk is not None and chunk < 1:
        raise ArqcError(f"--chunk must be at least 1, got {chunk}")
    ray = ray_module()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from an offline tool
    started = not ray.is_initialized()
    if started:
        _connect(ray, address)
    pool = None
    try:
        pool = RayPool(ray, workers, chunk, packages=packages)
        yield pool
    finally:
        if pool is not None:
            pool.close()
        if started:
            ray.shutdown()


def pool_for(ray: str | RayPool | None, workers: int | None = None, chunk: int | None = None):
    """A context manager giving the pool that ``ray`` names: None (run here), an open :class:`RayPool`, or an
    address for :func:`open_pool` (opened now, closed on exit)."""
    if ray is None and (workers is not None or chunk is not None):
        raise ArqcError("--ray-workers and --chunk belong to a distributed run: add --ray")
    if ray is None or isinstance(ray, RayPool):
        return nullcontext(ray)
    return open_pool(ray, workers, chunk)


def _connect(ray, address: str) -> None:
    import logging

    options = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address == "local":
        ray.init(include_dashboard=False, **options)
        return
    if address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise ArqcError(f"--ray {address!r} is not auto, local or HOST:PORT (e.g. 10.0.0.5:6379 or "
                            "ray://10.0.0.5:10001)")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as err:
            raise ArqcError(f"cannot reach a Ray cluster at {address} ({err.strerror or err}); start one with "
                            "`ray start --head` or check the address") from None
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        text = str(err).strip().splitlines()
        raise ArqcError(f"cannot connect to the Ray cluster at {address} ({text[0][:200] if text else err}); "
                        "start one with `ray start --head`, or use --ray local") from None
