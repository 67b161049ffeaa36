"""The Ray executor: generation replicas and sandbox workers as Ray actors, fed by one dispatcher loop.

All Ray code of evalpipe lives here (metrics in `evalpipe.telemetry`). What runs where:

- `GenerationReplica` actors, `--replicas` per (model, backend), named `gen/<backend>/<model>/<i>`: each
  builds its engine from the registry inside the actor. Engines that plan from the config alone (hf, vllm,
  openai) are built only there, never also in the driver; the run directory is created only once every
  replica has built its engine, so a missing model is one line and no directory.
  GPU engines (`vllm`; `hf` where the cluster has GPUs, unless `--engine-arg device=cpu`) reserve
  `num_gpus` (`--engine-arg num_gpus=N`, else vLLM's tensor_parallel_size, else 1); CPU engines reserve a
  small fraction of a CPU, so that a 2-core machine hosts replicas and sandbox workers together.
- `SandboxWorker` actors, named `sandbox/<i>`, each owning a one-runner sandbox of the run's kind, spread over
  the nodes (SPREAD); as many as `--workers`, else the cluster's CPUs. Where the cluster defines the custom
  resource `evalpipe_sandbox` (see deploy/), they go only to nodes that have it.
- Replicas of different arms that compute on the same device (a node's CPUs, the same GPU) take turns,
  batch by batch and round robin, one call in flight per device: arms whose latencies are compared never
  contend for a device, and each sees the same background load. Replicas on devices of their own (a GPU
  each, on a cluster) run at once.
- The driver (this process) keeps at most `CALLS_PER_ACTOR` calls in flight per actor, with small batches
  (at most `max_batch` requests, smaller when the queue is short so every actor gets work), and hands
  every generated sample to a sandbox worker at once: execution overlaps generation. One `ray.wait` loop
  watches every outstanding call. The driver stays the only writer of the run directory.

Failures: a replica or sandbox worker that dies is replaced (same name) and its in-flight work re-queued;
nothing is recorded twice because only keys not yet recorded are passed on. A (model, backend) whose
replicas die more than `MAX_RESTARTS` times, or a sandbox worker slot that does, ends the run with
`RunFailed` (the run directory stays resumable). A program that was running when its worker died twice is
recorded as `sandbox_error` instead of killing workers forever. An engine or sandbox that raises ends the run
with that error.

Actors live in a namespace of their own per run (`evalpipe-<identity>-<random>`), so two runs on one
cluster never clash, and the dashboard's Actors page reads like the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import ray
from ray.exceptions import ActorAlreadyExistsError, AuthenticationError, RayActorError, RayTaskError

from evalpipe.engines.base import Engine, EngineFactory, GenerationRequest
from evalpipe.errors import EvalpipeError, RunFailed, UserError
from evalpipe.executor import OnGeneration
from evalpipe.pipeline import RunPlan
from evalpipe.records import ClusterConfig, Generation, Record, RunConfig, SampleKey, SandboxLimits, Task
from evalpipe.registry import load
from evalpipe.sandbox.base import Job, JobResult, Sandbox
from evalpipe.suites import Suite
from evalpipe.telemetry import DriverMetrics, ReplicaMetrics, SandboxMetrics

MAX_BATCH = 8
"""Most requests per generate() call: small, so samples reach the sandbox soon after they exist."""
CALLS_PER_ACTOR = 2
"""Calls in flight per actor: one running, one queued behind it, so an actor never waits for the driver."""
EXEC_BATCH = 8
"""Most programs per sandbox call."""
MAX_RESTARTS = 3
"""Replica deaths per (model, backend), or deaths per sandbox worker slot, before the run fails."""
REPLICA_CPUS = 0.25
"""Logical CPUs a replica reserves (at most): the work of a GPU engine is on the GPU, and CPU engines on a
small machine must leave room for the sandbox workers, which do the CPU-heavy part."""
GPU_ENGINES = frozenset({"vllm"})
"""Engines that always need a GPU (vLLM, except its CPU build); others need one when `describe()["device"]`
starts with `cuda`."""
CUDA_WHERE_AVAILABLE = frozenset({"hf"})
"""Engines that take a GPU when their process sees one."""
READY_TIMEOUT_S = float(os.environ.get("EVALPIPE_READY_TIMEOUT_S", "1800"))
"""How long replicas may take to build their engines (load models, compile grammars, wait for resources)
before the run is refused, naming the replicas that are not ready (`$EVALPIPE_READY_TIMEOUT_S`)."""
SANDBOX_RESOURCE = "evalpipe_sandbox"
"""Custom Ray resource: when the cluster has it, sandbox workers run only on nodes that offer it."""
ENV_PREFIX = "EVALPIPE_"
"""The driver's environment variables with this prefix are passed on to every actor."""
CLOSE_GRACE_S = 3.0
"""How long close() lets actors release engines and sandboxes before killing them."""
STALL_WARNING_S = 120.0
"""Say so on stderr when nothing has come back for this long (e.g. actors waiting for resources)."""

Key = tuple[str, str, str, int]
Pair = tuple[str, str]
Role = Literal["generate", "execute"]


# -- actors ----------------------------------------------------------------------------------------------
class RunSpec(Record):
    """What every replica needs to build its engine; put in the object store once per run."""

    config: RunConfig
    suite: Suite
    tasks: list[Task]


class GenerationReplica:
    """One engine for one (model, backend), built inside the actor through the registry.

    A constructor error is kept and raised by every call, so that the driver sees the original exception
    (a `UserError` stays one) rather than an opaque "actor died in its creation task".
    """

    def __init__(self, spec: RunSpec, model: str, backend: str, replica: int) -> None:
        self._error: Exception | None = None
        self._engine: Engine | None = None
        self._metrics = ReplicaMetrics(model, backend, replica)
        self._tasks = {task.id: task for task in spec.tasks}
        try:
            factory = cast("EngineFactory", load("engine", spec.config.engine))
            self._engine = factory(spec.config, spec.suite, model, backend)
            self._engine.plan(spec.tasks)  # replay engines read their samples in plan(), as in the driver
        except Exception as error:  # re-raised by every call: see the class docstring
            self._error = error

    def _built(self) -> Engine:
        if self._error is not None:
            raise self._error
        assert self._engine is not None
        return self._engine

    def ready(self) -> dict[str, Any]:
        """Where this replica runs, once its engine is built."""
        engine = self._built()
        context = ray.get_runtime_context()
        gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        return {"pid": os.getpid(), "node_id": context.get_node_id(), "gpu_ids": gpu_ids, **engine.describe()}

    def generate(self, keys: list[Key]) -> list[Generation]:
        """Generate the samples with these keys. Only keys travel: the tasks came with the RunSpec, and
        shipping each request's task (prompt, tests, solution) with every call costs more than the call."""
        engine = self._built()
        requests = [
            GenerationRequest(
                key=SampleKey(model=model, backend=backend, task_id=task_id, index=index),
                task=self._tasks[task_id],
            )
            for model, backend, task_id, index in keys
        ]
        start = time.perf_counter()
        generations = list(engine.generate(requests))
        self._metrics.batch(generations, time.perf_counter() - start)
        return generations

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


class SandboxWorker:
    """One sandbox of the run's kind with a single runner; programs run one at a time, in arrival order."""

    def __init__(self, sandbox: str, limits: SandboxLimits, index: int) -> None:
        self._error: Exception | None = None
        self._sandbox: Sandbox | None = None
        self._metrics = SandboxMetrics(index)
        try:
            factory = cast("Callable[..., Sandbox]", load("sandbox", sandbox))
            self._sandbox = factory(limits, workers=1)
        except Exception as error:  # re-raised by every call, as in GenerationReplica
            self._error = error

    def _built(self) -> Sandbox:
        if self._error is not None:
            raise self._error
        assert self._sandbox is not None
        return self._sandbox

    def describe(self) -> dict[str, Any]:
        return self._built().describe()

    def run(self, jobs: list[Job]) -> list[tuple[Key, JobResult]]:
        results = [(job.key.as_tuple(), result) for job, result in self._built().run(jobs)]
        self._metrics.ran(len(results))
        return results

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()


# -- helpers ---------------------------------------------------------------------------------------------
def device_key(ready: dict[str, Any]) -> str | None:
    """The device a replica computes on, from its `ready()`: the node's CPUs, or the GPUs Ray gave it (all
    the node's GPUs when Ray gave it none but the engine uses CUDA). None where the engine names no device
    (the `openai` engine: its server computes)."""
    device = ready.get("device")
    if not isinstance(device, str) or not device:
        return None
    node = ready.get("node_id", "?")
    if device.startswith("cuda"):
        gpus = ready.get("gpu_ids") or []
        return f"{node}/cuda:{','.join(map(str, gpus))}" if gpus else f"{node}/cuda"
    return f"{node}/{device}"


def has_ray_default() -> bool:
    """Whether `ray[default]` (dashboard, metrics agent) is installed, not just the core."""
    return all(importlib.util.find_spec(name) is not None for name in ("aiohttp", "prometheus_client"))


def connect(cluster: ClusterConfig) -> bool:
    """Connect to Ray unless this process already is; True when this call did (and close() must undo it).

    No `--ray-address` and no RAY_ADDRESS (set by `ray job submit`): start a private local instance
    (`address="local"`, never silently joining some other instance on a shared machine), with all usable
    cores and the dashboard on 127.0.0.1 when `ray[default]` is there, and say where the dashboard is.
    """
    if ray.is_initialized():
        return False
    if cluster.ray_address is None and not os.environ.get("RAY_ADDRESS"):
        dashboard = has_ray_default()
        context = ray.init(
            address="local",
            num_cpus=len(os.sched_getaffinity(0)),
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,  # our own line below says what matters; Ray's INFO banner is noise
        )
        url = getattr(context, "dashboard_url", None)
        if dashboard and url:
            metrics_port = getattr(context, "address_info", {}).get("metrics_export_port")
            print(
                f"Ray dashboard: http://{url} (token: ~/.ray/auth_token)"
                + (f"; metrics: http://127.0.0.1:{metrics_port}/metrics" if metrics_port else ""),
                file=sys.stderr,
            )
        return True
    address = cluster.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=cluster.ray_address, logging_level=logging.WARNING)  # None: RAY_ADDRESS decides
    except (ConnectionError, AuthenticationError) as error:
        raise UserError(join_failure(str(address), error)) from None
    return True


def join_failure(address: str, error: BaseException) -> str:
    """One line for a cluster that cannot be joined: with Ray 2.60's token authentication on the cluster, a
    client without the token is refused, and Ray's message does not say so."""
    token_set = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if os.environ.get("RAY_AUTH_MODE") != "token" or not token_set:
        hint = (
            "if the cluster uses token authentication (Ray 2.60's default for `ray start`), set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token "
            "(on its head node: ~/.ray/auth_token)"
        )
    else:
        hint = (
            "is it running, and is RAY_AUTH_TOKEN the cluster's token (on its head node: ~/.ray/auth_token)?"
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"cannot join the Ray cluster at {address}: {first}; {hint}"


def actor_label(model: str) -> str:
    """A readable, name-safe label for a model: a directory's name, or a hub id with `/` as `--`."""
    looks_like_path = model.startswith(("/", "./", "../", "~")) or Path(model).is_dir()
    label = Path(model.rstrip("/")).name if looks_like_path else model.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", label)[:64] or "model"


def replica_names(pairs: Sequence[Pair]) -> dict[Pair, str]:
    """`gen/<backend>/<model label>` per pair, made unique where two models share a label."""
    names: dict[Pair, str] = {}
    taken: set[str] = set()
    for model, backend in pairs:
        base = f"gen/{backend}/{actor_label(model)}"
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}~{n}"
        taken.add(name)
        names[(model, backend)] = name
    return names


def _resources(available: bool = False) -> dict[str, float]:
    """The cluster's resources (total, or free now)."""
    found = ray.available_resources() if available else ray.cluster_resources()  # type: ignore[no-untyped-call]
    return cast("dict[str, float]", found)


def _floor(value: float) -> float:
    """Ray accounts resources in steps of 1e-4; stay on the safe side of a step."""
    return math.floor(value * 100) / 100


def _gpus_needed(plan: RunPlan, pair: Pair, cluster_gpus: float) -> float:
    """GPUs one replica of `pair` reserves: from the driver's engine where one was built, else by the rule in
    the module docstring."""
    engine = plan.engines.get(pair)
    if engine is not None:
        description = engine.describe()
        on_gpu = plan.config.engine in GPU_ENGINES or str(description.get("device", "")).startswith("cuda")
        return float(description.get("num_gpus", 1)) if on_gpu else 0.0
    args = {key.replace("-", "_"): value for key, value in plan.config.engine_args.items()}
    if plan.config.engine in GPU_ENGINES:
        from evalpipe.engines.vllm import cpu_build_installed

        if cpu_build_installed() and not plan.cluster.ray_address and not os.environ.get("RAY_ADDRESS"):
            return 0.0  # vLLM's CPU build on this machine's own Ray
        return float(args.get("num_gpus") or args.get("tensor_parallel_size") or 1)
    if plan.config.engine in CUDA_WHERE_AVAILABLE and args.get("num_gpus"):
        return float(args["num_gpus"])  # asked for: reserved even for a CPU engine (a whole node's share)
    if (
        plan.config.engine in CUDA_WHERE_AVAILABLE
        and cluster_gpus > 0
        and args.get("device", "cuda") != "cpu"
    ):
        return 1.0
    return 0.0


def _joined(plan: RunPlan) -> bool:
    """Whether the run joined a cluster (which an autoscaler may grow) rather than starting its own Ray."""
    return bool(plan.cluster.ray_address or os.environ.get("RAY_ADDRESS"))


def _share_gpus(plan: RunPlan, needs: dict[Pair, float], cluster_gpus: float) -> dict[Pair, float]:
    """Where the `hf` engine's replicas would each take a whole GPU by default and there are fewer GPUs than
    replicas, they share them (each reserves an equal fraction): a small model's replicas fit one device.
    An explicit `--engine-arg num_gpus` is kept as given."""
    args = {key.replace("-", "_") for key in plan.config.engine_args}
    total = sum(needs.values()) * plan.cluster.replicas
    if plan.config.engine not in CUDA_WHERE_AVAILABLE or "num_gpus" in args or not 0 < cluster_gpus < total:
        return needs
    replicas = sum(1 for gpus in needs.values() if gpus) * plan.cluster.replicas
    share = _floor(cluster_gpus / replicas)
    print(f"{replicas} generation replicas share {cluster_gpus:g} GPU(s): {share:g} each", file=sys.stderr)
    return {pair: share if gpus else 0.0 for pair, gpus in needs.items()}


def _check_gpus(
    plan: RunPlan, needs: dict[Pair, float], names: dict[Pair, str], cluster_gpus: float, *, local: bool
) -> None:
    """Count GPUs over every replica of every pair before any actor starts: a run needing more than the
    cluster has is refused with one line (on a joined cluster, whose autoscaler may add nodes, it is said
    and the run waits). A fraction (`--engine-arg num_gpus=0.5`) lets replicas share a device."""
    replicas = plan.cluster.replicas
    total = sum(needs.values()) * replicas
    if not total or total <= cluster_gpus + 1e-9:
        return
    each = ", ".join(f"{names[pair]} x{replicas}: {gpus:g}" for pair, gpus in needs.items() if gpus)
    message = (
        f"engine {plan.config.engine!r} needs {total:g} GPU(s) in all ({each}); "
        f"the cluster has {cluster_gpus:g}"
    )
    if local:
        share = (
            "; fewer backends or replicas, or --engine-arg num_gpus=FRACTION to share a device"
            if cluster_gpus
            else ""
        )
        raise UserError(message + share)
    print(f"{message}: waiting for the autoscaler to add GPU nodes", file=sys.stderr)


def _cause(error: RayTaskError) -> BaseException:
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(eq=False)
class _Slot:
    """One actor position; its actor is replaced (same name) when it dies."""

    role: Role
    name: str
    index: int
    pair: Pair | None
    remote_class: Any
    args: tuple[Any, ...]
    options: dict[str, Any]
    handle: Any = None
    incarnation: int = 0
    in_flight: int = 0
    restarts: int = 0
    device: str | None = None
    """Where a replica's engine computes (`node/cpu`, `node/cuda:0`), from its `ready()`; None for engines
    that compute elsewhere (a server). Arms that share a device take turns: see `_State.submit`."""


@dataclass(eq=False)
class _Call:
    slot: _Slot
    incarnation: int
    requests: list[GenerationRequest] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)


# -- the executor ----------------------------------------------------------------------------------------
class RayExecutor:
    """Generation replicas and sandbox workers as Ray actors; see the module docstring."""

    def __init__(self, plan: RunPlan, *, max_batch: int = MAX_BATCH) -> None:
        self._plan = plan
        self._max_batch = max_batch
        self._closed = False
        self._slots: list[_Slot] = []
        self._engine_info: dict[str, dict[str, Any]] | None = None
        try:
            self._owns_ray = connect(plan.cluster)
        except Exception as error:  # one line for the user, not a Ray traceback
            where = plan.cluster.ray_address or os.environ.get("RAY_ADDRESS") or "a local instance"
            raise UserError(f"cannot start or join Ray ({where}): {_first_line(error)}") from error
        try:
            self._start(plan)
        except BaseException:
            self.close()
            raise

    def _start(self, plan: RunPlan) -> None:
        self.namespace = f"evalpipe-{plan.identity[:8]}-{secrets.token_hex(3)}"
        self._metrics = DriverMetrics()
        resources = _resources()
        cpus = float(resources.get("CPU", 1.0))
        self.workers = plan.cluster.workers or max(1, int(cpus))
        pairs = list(plan.pairs)
        n_replicas = len(pairs) * plan.cluster.replicas
        replica_cpus = _floor(min(REPLICA_CPUS, cpus / 2 / max(1, n_replicas))) or 0.01
        sandbox_cpus = _floor(min(1.0, max(cpus - n_replicas * replica_cpus, 0.0) / self.workers)) or 0.01
        common: dict[str, Any] = {
            "namespace": self.namespace,
            "max_restarts": 0,
            "scheduling_strategy": "SPREAD",
        }
        env = {name: value for name, value in os.environ.items() if name.startswith(ENV_PREFIX)}
        if env:
            common["runtime_env"] = {"env_vars": env}

        replica_class = ray.remote(GenerationReplica)
        shared = ray.put(RunSpec(config=plan.config, suite=plan.suite, tasks=plan.tasks))
        names = replica_names(pairs)
        cluster_gpus = float(resources.get("GPU", 0.0))
        needs = _share_gpus(
            plan, {pair: _gpus_needed(plan, pair, cluster_gpus) for pair in pairs}, cluster_gpus
        )
        _check_gpus(plan, needs, names, cluster_gpus, local=self._owns_ray and not _joined(plan))
        for pair in pairs:
            gpus = needs[pair]
            options = {**common, "num_cpus": replica_cpus, "num_gpus": gpus}
            for i in range(plan.cluster.replicas):
                args: tuple[Any, ...] = (shared, pair[0], pair[1], i)
                self._slots.append(
                    _Slot("generate", f"{names[pair]}/{i}", i, pair, replica_class, args, options)
                )

        sandbox_class = ray.remote(SandboxWorker)
        options = {**common, "num_cpus": sandbox_cpus}
        if SANDBOX_RESOURCE in resources:
            options["resources"] = {SANDBOX_RESOURCE: 0.01}
        for i in range(self.workers):
            args = (plan.config.sandbox, plan.config.limits, i)
            self._slots.append(_Slot("execute", f"sandbox/{i}", i, None, sandbox_class, args, options))
        for slot in self._slots:
            self._launch(slot)
        if plan.config.sandbox == "process":
            from evalpipe.sandbox.process import WARNING

            print(f"WARNING: {WARNING}", file=sys.stderr)

    def _launch(self, slot: _Slot) -> None:
        """Start the slot's actor; after a death the name frees up within moments, so retry briefly."""
        deadline = time.monotonic() + 10.0
        while True:
            try:
                # An ObjectRef argument (the shared RunSpec) is resolved by Ray before the actor gets it.
                handle = slot.remote_class.options(**slot.options, name=slot.name).remote(*slot.args)
                break
            except ActorAlreadyExistsError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        slot.handle = handle
        slot.incarnation += 1
        slot.in_flight = 0

    @property
    def _replicas(self) -> list[_Slot]:
        return [slot for slot in self._slots if slot.role == "generate"]

    @property
    def _sandboxes(self) -> list[_Slot]:
        return [slot for slot in self._slots if slot.role == "execute"]

    def _fail(self, slot: _Slot, error: RayTaskError) -> EvalpipeError:
        """The run-ending error for an exception raised inside an actor: evalpipe's own errors unchanged."""
        cause = _cause(error)
        if isinstance(cause, EvalpipeError):
            return cause
        return RunFailed(f"{slot.name} failed: {type(cause).__name__}: {_first_line(cause)}")

    # -- Executor protocol ------------------------------------------------------------------------------
    def sandbox_info(self) -> dict[str, Any]:
        """The first sandbox worker's description, with the run's worker count; waits for it to start."""
        slot = self._sandboxes[0]
        ref = slot.handle.describe.remote()
        ready, _ = ray.wait([ref], timeout=30.0)
        if not ready:
            print("waiting for the sandbox workers to start (free resources?)", file=sys.stderr)
        try:
            info = cast("dict[str, Any]", ray.get(ref))
        except RayTaskError as error:
            raise self._fail(slot, error) from None
        except RayActorError as error:
            raise RunFailed(f"{slot.name} could not start: {_first_line(error)}") from None
        return {**info, "workers": self.workers, "executor": "ray: one single-runner sandbox per actor"}

    def engine_info(self, timeout_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Waits until every replica has built its engine; the first replica's `describe()` per pair. A
        replica that fails ends the run at once; one not ready within `timeout_s` (default
        `READY_TIMEOUT_S`) fails it, naming the replicas that are stuck. Asked once: it also learns where
        each replica computes (`_Slot.device`)."""
        if self._engine_info is None:
            self._engine_info = self._ready(timeout_s)
        return self._engine_info

    def _ready(self, timeout_s: float | None) -> dict[str, dict[str, Any]]:
        limit = READY_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        refs = {slot.handle.ready.remote(): slot for slot in self._replicas}
        described: dict[Any, dict[str, Any]] = {}
        waiting = list(refs)
        said = False
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = ", ".join(refs[ref].name for ref in waiting)
                raise RunFailed(
                    f"generation replica(s) not ready after {limit:g} s: {stuck} (waiting for resources the "
                    "cluster lacks, or still loading: `ray status` shows pending demands; "
                    "$EVALPIPE_READY_TIMEOUT_S sets the wait)"
                )
            done, waiting = ray.wait(waiting, num_returns=1, timeout=min(left, 30.0))
            if not done and not said:
                print("waiting for the generation replicas to load their models", file=sys.stderr)
                said = True
            for ref in done:
                slot = refs[ref]
                try:
                    described[ref] = cast("dict[str, Any]", ray.get(ref))
                except RayTaskError as error:
                    raise self._fail(slot, error) from None
                except RayActorError as error:
                    raise RunFailed(f"{slot.name} could not start: {_first_line(error)}") from None
        info: dict[str, dict[str, Any]] = {}
        for ref, slot in refs.items():
            assert slot.pair is not None
            slot.device = device_key(described[ref])
            info.setdefault(f"{slot.pair[0]}/{slot.pair[1]}", described[ref])
        return info

    def run(
        self, requests: Sequence[GenerationRequest], pending: Sequence[Job], on_generation: OnGeneration
    ) -> Iterator[tuple[Job, JobResult]]:
        """Generate `requests` on the replicas and execute every sample and `pending` job, overlapped."""
        self.engine_info()  # where each replica computes decides which arms take turns
        return self._dispatch(requests, pending, on_generation)

    def generate_only(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Generate without executing (benchmarks: the generation-only time of a run)."""
        generations: list[Generation] = []

        def keep(generation: Generation) -> None:
            generations.append(generation)

        self.engine_info()
        for _ in self._dispatch(requests, (), keep):
            pass
        return generations

    def close(self) -> None:
        """Let actors release engines and sandboxes briefly, then kill them; disconnect if we connected."""
        if self._closed:
            return
        self._closed = True
        try:
            handles = [slot.handle for slot in self._slots if slot.handle is not None]
            refs = []
            for handle in handles:
                with contextlib.suppress(RayActorError):
                    refs.append(handle.close.remote())
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=CLOSE_GRACE_S)
            for handle in handles:
                with contextlib.suppress(RayActorError, ValueError):
                    ray.kill(handle)
        finally:
            if self._owns_ray:
                ray.shutdown()

    # -- the dispatcher ---------------------------------------------------------------------------------
    def _dispatch(
        self,
        requests: Sequence[GenerationRequest],
        pending: Sequence[Job],
        on_generation: Callable[[Generation], Job | None],
    ) -> Iterator[tuple[Job, JobResult]]:
        state = _State(self, requests, pending)
        last_report = 0.0
        last_progress = time.monotonic()
        warned = False
        try:
            while True:
                state.submit()
                now = time.monotonic()
                if now - last_report > 0.25:
                    state.report()
                    last_report = now
                if not state.calls:
                    break
                ready, _ = ray.wait(list(state.calls), num_returns=1, timeout=1.0)
                if not ready:
                    if not warned and time.monotonic() - last_progress > STALL_WARNING_S:
                        warned = True
                        print(
                            f"nothing came back for {STALL_WARNING_S:.0f} s; free resources: "
                            f"{_resources(available=True)}",
                            file=sys.stderr,
                        )
                    continue
                last_progress = time.monotonic()
                for ref in ready:
                    yield from state.collect(ref, on_generation)
            state.check_done()
        finally:
            state.report(final=True)


class _State:
    """The dispatcher's queues and outstanding calls for one `run`."""

    def __init__(self, executor: RayExecutor, requests: Sequence[GenerationRequest], pending: Sequence[Job]):
        self.executor = executor
        self.metrics = executor._metrics
        self.replicas = executor._replicas
        self.sandboxes = executor._sandboxes
        self.queues: dict[Pair, deque[GenerationRequest]] = {
            slot.pair: deque() for slot in self.replicas if slot.pair
        }
        tasks = {task.id: task for task in executor._plan.tasks}
        for request in requests:
            if tasks.get(request.task.id) != request.task:
                raise RunFailed(f"request {request.key} is for a task that is not in the run's plan")
            pair = (request.key.model, request.key.backend)
            if pair not in self.queues:
                raise RunFailed(f"no replica serves model {pair[0]!r} with backend {pair[1]!r}")
            self.queues[pair].append(request)
        self.jobs: deque[Job] = deque(pending)
        self.calls: dict[Any, _Call] = {}
        self.generated: set[Key] = {job.key.as_tuple() for job in pending}
        self.executed: set[Key] = set()
        self.lost_with_worker: dict[Key, int] = {}
        self.pair_restarts: dict[Pair, int] = {}
        self.expected = len(requests) + len(pending)
        self.turns = self._turns()

    def _turns(self) -> dict[str, deque[_Slot]]:
        """Replicas of different arms (model, backend) that compute on the same device, by device, in turn
        order. Their latencies are compared with each other, so they must not contend for the device: they
        take turns batch by batch (one call in flight per device), round robin, so that every arm also sees
        the same background load (the sandbox workers beside them) over the run."""
        by_device: dict[str, list[_Slot]] = {}
        for slot in self.replicas:
            if slot.device is not None:
                by_device.setdefault(slot.device, []).append(slot)
        return {
            device: deque(slots)
            for device, slots in by_device.items()
            if len({slot.pair for slot in slots}) > 1
        }

    def _submit_in_turn(self, slots: deque[_Slot]) -> None:
        """Send one batch to the next replica (round robin) whose arm has work, if the device is free."""
        if any(slot.in_flight for slot in slots):
            return
        for _ in range(len(slots)):
            slot = slots[0]
            slots.rotate(-1)
            assert slot.pair is not None
            queue = self.queues[slot.pair]
            if queue:
                batch = [queue.popleft() for _ in range(min(self.executor._max_batch, len(queue)))]
                keys = [request.key.as_tuple() for request in batch]
                self._send(slot, _Call(slot, slot.incarnation, requests=batch), slot.handle.generate, keys)
                return

    # -- sending work
    def submit(self) -> None:
        taking_turns = {id(slot) for slots in self.turns.values() for slot in slots}
        for slots in self.turns.values():
            self._submit_in_turn(slots)
        for slot in self.replicas:
            assert slot.pair is not None
            queue = self.queues[slot.pair]
            while queue and slot.in_flight < CALLS_PER_ACTOR and id(slot) not in taking_turns:
                free = sum(CALLS_PER_ACTOR - s.in_flight for s in self.replicas if s.pair == slot.pair)
                size = max(1, min(self.executor._max_batch, math.ceil(len(queue) / max(1, free))))
                batch = [queue.popleft() for _ in range(min(size, len(queue)))]
                keys = [request.key.as_tuple() for request in batch]
                self._send(slot, _Call(slot, slot.incarnation, requests=batch), slot.handle.generate, keys)
        for slot in self.sandboxes:
            while self.jobs and slot.in_flight < CALLS_PER_ACTOR:
                free = sum(CALLS_PER_ACTOR - s.in_flight for s in self.sandboxes)
                size = max(1, min(EXEC_BATCH, math.ceil(len(self.jobs) / max(1, free))))
                jobs = [self.jobs.popleft()]
                # A program that was running when a worker died goes alone, so a second death is its own.
                if not self.lost_with_worker.get(jobs[0].key.as_tuple()):
                    while (
                        self.jobs
                        and len(jobs) < size
                        and not self.lost_with_worker.get(self.jobs[0].key.as_tuple())
                    ):
                        jobs.append(self.jobs.popleft())
                self._send(slot, _Call(slot, slot.incarnation, jobs=jobs), slot.handle.run, jobs)

    def _send(self, slot: _Slot, call: _Call, method: Any, payload: list[Any]) -> None:
        self.calls[method.remote(payload)] = call
        slot.in_flight += 1

    # -- receiving results
    def collect(
        self, ref: Any, on_generation: Callable[[Generation], Job | None]
    ) -> Iterator[tuple[Job, JobResult]]:
        call = self.calls.pop(ref)
        slot = call.slot
        if call.incarnation == slot.incarnation:
            slot.in_flight -= 1
        try:
            value = ray.get(ref)
        except RayTaskError as error:
            raise self.executor._fail(slot, error) from None
        except RayActorError as error:
            yield from self._lost(call, error)
            return
        if slot.role == "generate":
            self._generated(call, cast("list[Generation]", value), on_generation)
            return
        jobs = {job.key.as_tuple(): job for job in call.jobs}
        for key, result in cast("list[tuple[Key, JobResult]]", value):
            if key in self.executed or key not in jobs:
                continue  # a job re-run after its worker was thought dead: the first result counts
            self.executed.add(key)
            self.metrics.executed(jobs[key].key, result)
            yield jobs[key], result

    def _generated(
        self, call: _Call, generations: list[Generation], on_generation: Callable[[Generation], Job | None]
    ) -> None:
        returned = {generation.key.as_tuple() for generation in generations}
        missing = [r.key for r in call.requests if r.key.as_tuple() not in returned]
        if missing:
            raise RunFailed(f"{call.slot.name} returned no sample for {missing[0]} ({len(missing)} missing)")
        for generation in generations:
            key = generation.key.as_tuple()
            if key in self.generated:
                continue  # already recorded (a re-queued request): never count a sample twice
            self.generated.add(key)
            job = on_generation(generation)
            self.metrics.generated(generation)
            if job is not None:
                self.jobs.append(job)

    def _lost(self, call: _Call, error: RayActorError) -> Iterator[tuple[Job, JobResult]]:
        """An actor died with this call in flight: replace it (once per death) and re-queue the work."""
        slot = call.slot
        if call.incarnation == slot.incarnation:
            self._restart(slot, error, len(call.requests) or len(call.jobs))
        if slot.role == "generate":
            assert slot.pair is not None
            self.queues[slot.pair].extendleft(reversed(call.requests))
            return
        for job in reversed(call.jobs):
            key = job.key.as_tuple()
            if key in self.executed:
                continue
            deaths = self.lost_with_worker[key] = self.lost_with_worker.get(key, 0) + 1
            if deaths >= 2 and len(call.jobs) == 1:
                self.executed.add(key)
                result = JobResult(
                    status="sandbox_error",
                    passed=False,
                    note=f"the sandbox worker died twice while running this program: {_first_line(error)}",
                    attempts=deaths,
                )
                self.metrics.executed(job.key, result)
                yield job, result
            else:
                self.jobs.appendleft(job)

    def _restart(self, slot: _Slot, error: RayActorError, lost: int) -> None:
        model, backend = slot.pair or ("", "")
        slot.restarts += 1
        deaths = slot.restarts
        if slot.pair is not None:
            deaths = self.pair_restarts[slot.pair] = self.pair_restarts.get(slot.pair, 0) + 1
        self.metrics.restarted(slot.role, model, backend)
        what = f"engine {model}/{backend}" if slot.pair is not None else slot.name
        if deaths > MAX_RESTARTS:
            raise RunFailed(
                f"{what} keeps dying ({deaths} deaths; last: {_first_line(error)}); "
                "the run directory is resumable"
            )
        print(
            f"{slot.name} died ({_first_line(error)}); replacing it, {lost} item(s) re-queued",
            file=sys.stderr,
        )
        with contextlib.suppress(RayActorError, ValueError):
            ray.kill(slot.handle)  # it may be unreachable rather than dead: make sure
        self.executor._launch(slot)

    # -- end and gauges
    def check_done(self) -> None:
        left = sum(len(queue) for queue in self.queues.values()) + len(self.jobs)
        if left:
            raise RunFailed(f"{left} item(s) left undone with nothing in flight (no actor to run them)")

    def report(self, final: bool = False) -> None:
        pairs = list(self.queues)
        requests = dict.fromkeys(pairs, 0)
        jobs = dict.fromkeys(pairs, 0)
        queued = {(*pair, stage): 0 for pair in pairs for stage in ("generate", "execute")}
        if not final:
            for call in self.calls.values():
                for request in call.requests:
                    pair = (request.key.model, request.key.backend)
                    requests[pair] = requests.get(pair, 0) + 1
                for job in call.jobs:
                    pair = (job.key.model, job.key.backend)
                    jobs[pair] = jobs.get(pair, 0) + 1
            for pair, queue in self.queues.items():
                queued[(*pair, "generate")] = len(queue)
            for job in self.jobs:
                stage_key = (job.key.model, job.key.backend, "execute")
                queued[stage_key] = queued.get(stage_key, 0) + 1
        self.metrics.state(requests, jobs, queued)
