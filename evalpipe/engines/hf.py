"""The `hf` engine: transformers models on CPU or GPU, with llguidance or XGrammar token masks at every step.

The decode loop is our own (not `model.generate`) so that masking, stopping and timing are under our control:

- **Batches.** Requests are sorted by prompt length and decoded `batch_size` at a time: one forward pass per
  step for every unfinished sequence of the batch, prompts left-padded, with an attention mask and explicit
  position ids so that padding changes nothing (greedy output is the same at any batch size). Finished
  sequences are dropped from the KV cache (`DynamicCache.batch_select_indices`) so they cost nothing more.
- **Masks.** Each step's masks can be filled while that step's forward pass runs: both depend only on the
  tokens chosen so far, so once a step's tokens are chosen and accepted into the matchers (`_advance`), the
  mask threads (`mask_threads`; none by default on 2 cores) start filling one int32 bitmask row per
  constrained sequence and the decoding thread starts the forward pass. llguidance releases the GIL while it
  fills a row, as torch does inside its kernels, so the two run side by side (XGrammar 0.2.8 holds it: no
  overlap). When the forward pass is done, the decoding thread fills the rows no mask thread has taken yet
  (see `_MaskFill`), then applies all rows to the logits in one `xgrammar.apply_token_bitmask_inplace` call
  (its native CPU kernel on CPU: llguidance's own apply is `torch.compile`d and costs over a minute on its
  first CPU call). Both matchers allow EOS only where the grammar accepts; a token a matcher rejects ends its
  sequence with an error.
- **Ending** follows `evalpipe.completion` in every arm: EOS, the suite's stop sequences (checked on the
  decoded tail, a stop at the very start included; constrained arms too, where the grammar lets them write
  one), or max tokens.
- **Reasoning first** (chat suites, models whose vocabulary has `<think>` and `</think>` as single tokens):
  the reply's first token may open a reasoning block, which runs unconstrained and without stop sequences to
  `</think>`; the grammar's matcher starts after it (`_AfterReasoning`), as in vLLM with a reasoning parser.
  The block's tokens are `n_reasoning_tokens`.
- **Grammars** are compiled once per engine and held for its life. A slow XGrammar compile (see
  `XGRAMMAR_DISK_CACHE_MIN_S`) is also kept on disk (`CompiledGrammar.serialize_json`, under
  `<cache>/xgrammar/`), keyed by the grammar's sha256, the tokenizer's vocabulary, the mask width, the stop
  tokens and the xgrammar version and serialisation format. llguidance compiles in milliseconds and its
  matchers cannot be serialised; each sample gets a `deep_copy` of one compiled matcher (microseconds).

Timing (what each Generation reports), for a sequence in a batch:

- `ttft_s`, `e2e_s`: wall time from the start of its batch's prefill to its first token / its end; `tpot_s` =
  (e2e - ttft) / (tokens - 1). Every step's whole wall time counts for each sequence in that step, as it does
  for a request in a vLLM batch; sequences of one batch share a prefill, so a short prompt's TTFT includes the
  longer prompts' prefill. Time spent outside the engine while it has yielded a record is not counted.
- `mask_s_per_token`: the sequence's own fill time (on whichever thread filled its row) plus an equal share of
  the batched apply, divided by the number of masked steps.
- `mask_unhidden_s_per_token`: an equal share of each step's mask time that the forward pass did not hide
  (starting the fill, completing it after the forward pass, the apply), divided likewise. At batch size 1 it
  is what masks add to TPOT; in a batch of n, about n times it. It leaves out what sharing the cores costs the
  forward pass itself; the tokens/s ratio in `benchmarks/bench_masks.py` shows the whole cost.
- `grammar_compile_s` / `grammar_cache_hit`: the engine's one compile (or disk-cache load) for this grammar,
  the same on every sample; it is never part of a sample's latency.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import itertools
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self, cast

import llguidance
import llguidance.hf
import llguidance.torch
import torch
import xgrammar
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from evalpipe.completion import (
    complete,
    constraint_satisfied,
    find_stop,
    lead_of,
    reasoning_token_ids,
    stop_sequences,
)
from evalpipe.engines.base import GenerationRequest, plan_requests
from evalpipe.engines.builtin import builtin_model_dir
from evalpipe.engines.common import (
    WARMUP_MAX_TOKENS,
    check_chat_template,
    check_outlines,
    package_version,
    package_versions,
    warmup_request,
)
from evalpipe.engines.options import HFOptions
from evalpipe.errors import UserError
from evalpipe.paths import cache_root
from evalpipe.prompting import chat_messages, sample_seed
from evalpipe.records import FinishReason, Generation, RunConfig, Task
from evalpipe.suites import Suite

if TYPE_CHECKING:
    from evalpipe.constraints import Constraint

GRAMMAR_BACKENDS = ("guidance", "xgrammar")
SUPPORTED_BACKENDS = ("none", *GRAMMAR_BACKENDS, "auto")


# ------------------------------------------------------------------------------------------------------------
# Models: loaded once per process and shared by the engines of one run (one per backend), released on close.


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    path: str
    load_s: float
    key: tuple[str, str, str]
    users: int = 0


_MODELS: dict[tuple[str, str, str], _Loaded] = {}
_MODELS_LOCK = threading.Lock()


def cpu_threads() -> int:
    """Torch threads for CPU decoding: `$EVALPIPE_TORCH_THREADS`, else half the usable cores (at least one).

    Decoding a small model issues many tiny ops; with every core in torch's pool, one busy core (the sandbox
    runs beside generation) stalls each op: on 2 shared cores a 5 M model's step took a median 11-13 ms and a
    p90 of 60-270 ms with 2 threads, against 2.4-6.5 ms and under 8 ms with 1. Torch's setting is per process.
    """
    configured = os.environ.get("EVALPIPE_TORCH_THREADS")
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            raise UserError(f"EVALPIPE_TORCH_THREADS must be a number, not {configured!r}") from None
    return max(1, len(os.sched_getaffinity(0)) // 2)


def mask_threads() -> int:
    """Threads that fill token masks beside the forward pass: `$EVALPIPE_MASK_THREADS`, else the usable cores
    left after torch's (`cpu_threads`) and one more, for the sandbox and the rest of the host. 0: no overlap,
    the decoding thread fills every row after the forward pass (as before issue 14).

    Torch keeps its half: its pool stalls at every op when one of its cores is busy, and the forward pass is
    the critical path. A mask thread only pays where it has a core of its own: with none free, waking it and
    passing the GIL to and fro costs the decoding thread about what the fill it hides saves (a small model's
    forward pass is mostly Python, which holds the GIL). Measured on a shared 2-core host (load 3-4), guidance
    against `none`, paired per batch, 4 runs each: 0.87-0.91x at batch size 1 and 0.70-0.92x at 8 with a
    mask thread, 0.91-0.94x and 0.82-0.87x without. XGrammar 0.2.8's fill holds the GIL (its tvm-ffi
    binding), so it does not overlap a Python forward pass at all (0.39x vs 0.40x at batch size 1). So
    2 cores: none; 4: one; 16: seven.
    """
    configured = os.environ.get("EVALPIPE_MASK_THREADS")
    if configured:
        try:
            return max(0, int(configured))
        except ValueError:
            raise UserError(f"EVALPIPE_MASK_THREADS must be a number, not {configured!r}") from None
    return max(0, len(os.sched_getaffinity(0)) - cpu_threads() - 1)


def online() -> bool:
    """Whether models may be downloaded: only when the user says so (`EVALPIPE_ONLINE=1`)."""
    return os.environ.get("EVALPIPE_ONLINE", "") == "1"


def resolve_model(model: str) -> tuple[str, bool]:
    """(what to pass to `from_pretrained`, local files only?) for a model name, folder or Hugging Face id."""
    if model == "builtin":
        return str(builtin_model_dir()), True
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    if path.exists():
        raise UserError(f"model {model!r} is a file; give a model folder or a Hugging Face model id")
    if model.startswith((".", "/", "~")):
        raise UserError(f"model folder {model} does not exist")
    return model, not online()


def torch_dtype(dtype: str, device: str) -> torch.dtype | str:
    """What `from_pretrained` gets for an `--engine-arg dtype=...`: `auto` is float32 on CPU (a checkpoint's
    half precision is slow there), the checkpoint's own dtype elsewhere."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else "auto"
    return cast("torch.dtype", getattr(torch, dtype))


def _acquire_model(model: str, device: str, dtype: str = "auto") -> _Loaded:
    source, local_only = resolve_model(model)
    key = (source, device, dtype)
    with _MODELS_LOCK:
        loaded = _MODELS.get(key)
        if loaded is None:
            started = time.perf_counter()
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
                network: Any = AutoModelForCausalLM.from_pretrained(
                    source, local_files_only=local_only, dtype=torch_dtype(dtype, device)
                )
            except (OSError, ValueError) as error:
                if local_only and not Path(source).is_dir():
                    raise UserError(
                        f"model {model!r} is neither a local folder nor in the Hugging Face cache "
                        "(evalpipe does not download; set EVALPIPE_ONLINE=1 to allow it)"
                    ) from None
                first_line = (
                    str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                )
                raise UserError(f"model {model!r} cannot be loaded: {first_line}") from None
            try:
                network.to(device).eval()
            except (
                RuntimeError,
                AssertionError,
            ) as error:  # torch: "Torch not compiled with CUDA", no device
                raise UserError(f"--engine-arg device={device}: {_one_line(str(error))}") from None
            loaded = _Loaded(network, tokenizer, source, time.perf_counter() - started, key)
            _MODELS[key] = loaded
        loaded.users += 1
        return loaded


def _release_model(loaded: _Loaded) -> None:
    with _MODELS_LOCK:
        loaded.users -= 1
        if loaded.users <= 0:
            _MODELS.pop(loaded.key, None)


# ------------------------------------------------------------------------------------------------------------
# Grammars: one compiled grammar per engine; each sample gets a fresh matcher from it.


class _Matcher(Protocol):
    def fill(self, bitmask: torch.Tensor, row: int) -> None: ...

    def accept(self, token: int) -> bool: ...

    def error(self) -> str: ...


class _CompiledGrammar(Protocol):
    compile_s: float
    cache_hit: bool
    cache_path: str | None

    def matcher(self) -> _Matcher: ...


class _GuidanceMatcher:
    __slots__ = ("_m",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        # `llguidance.torch.fill_next_token_bitmask` without its checks and row slicing (torch calls that
        # bounce the GIL on a mask thread); `_new_bitmask` makes a contiguous int32 CPU tensor.
        row_bytes = bitmask.shape[1] * 4
        self._m.unsafe_compute_mask_ptr(bitmask.data_ptr() + row * row_bytes, row_bytes)

    def accept(self, token: int) -> bool:
        return bool(self._m.consume_token(token))

    def error(self) -> str:
        return str(self._m.get_error())


class _GuidanceGrammar:
    """llguidance: the compiled grammar is a matcher in its start state; samples get deep copies."""

    cache_path: str | None = None

    def __init__(self, constraint: Constraint, tokenizer: llguidance.LLTokenizer) -> None:
        from evalpipe.constraints import llguidance_grammar

        started = time.perf_counter()
        grammar = llguidance_grammar(constraint)
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        # LLMatcher never raises on a bad grammar: it enters an error state that only get_error() reveals.
        if template.is_error():
            raise UserError(f"backend 'guidance' rejects the grammar: {_one_line(template.get_error())}")
        self._template = template
        self.compile_s = time.perf_counter() - started
        self.cache_hit = False

    def matcher(self) -> _Matcher:
        return _GuidanceMatcher(self._template.deep_copy())


class _XGrammarMatcher:
    __slots__ = ("_m",)

    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self._m.accept_token(token))

    def error(self) -> str:
        return "xgrammar rejected the token"


XGRAMMAR_DISK_CACHE_MIN_S = 5.0
"""Compiled XGrammar grammars go to the disk cache only when compiling took at least this long.

The serialised form holds the adaptive token-mask cache and is large and slow to read: for the Python-body
grammar and the built-in model's 8k vocabulary, a 0.2 s compile serialises to 171 MB of JSON in 8 s and
loads in 3 s. Only slow compiles (large vocabularies, large grammars) gain from the disk.
"""


class _XGrammarGrammar:
    """XGrammar: compiled once, or loaded from the disk cache; each sample gets its own GrammarMatcher."""

    def __init__(self, constraint: Constraint, info: xgrammar.TokenizerInfo, tokenizer_key: str) -> None:
        from evalpipe.constraints import xgrammar_compiled

        key_source = json.dumps(
            {
                "grammar": constraint.kind,
                "sha256": dict(sorted(constraint.sha256.items())),
                "tokenizer": tokenizer_key,
                "xgrammar": package_version("xgrammar"),
                "format": xgrammar.get_serialization_version(),
            },
            sort_keys=True,
        )
        path = cache_root() / "xgrammar" / f"{hashlib.sha256(key_source.encode()).hexdigest()[:32]}.json"
        started = time.perf_counter()
        compiled = _load_compiled(path, info)
        self.cache_hit = compiled is not None
        if compiled is None:
            compiler = xgrammar.GrammarCompiler(info, max_threads=max(1, len(os.sched_getaffinity(0))))
            try:
                compiled = xgrammar_compiled(constraint, compiler)
            except UserError as error:
                raise _naming("xgrammar", error) from None
            except (RuntimeError, ValueError) as error:
                raise UserError(f"backend 'xgrammar' rejects the grammar: {_one_line(str(error))}") from None
        self._compiled = compiled
        self.compile_s = time.perf_counter() - started  # the disk write below is not compile time
        stored = not self.cache_hit and self.compile_s >= XGRAMMAR_DISK_CACHE_MIN_S
        if stored:
            _store_compiled(path, compiled)
        self.cache_path: str | None = str(path) if self.cache_hit or stored else None

    def matcher(self) -> _Matcher:
        return _XGrammarMatcher(xgrammar.GrammarMatcher(self._compiled))


def _load_compiled(path: Path, info: xgrammar.TokenizerInfo) -> xgrammar.CompiledGrammar | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        return xgrammar.CompiledGrammar.deserialize_json(text, info)
    except (RuntimeError, ValueError):
        # A stale or torn cache entry (its metadata, version or JSON does not match): compile again.
        return None


def _store_compiled(path: Path, compiled: xgrammar.CompiledGrammar) -> None:
    """Atomic write (temp file + rename): a concurrent reader sees the old entry or the whole new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        with os.fdopen(handle, "w") as out:
            out.write(compiled.serialize_json())
        Path(tmp).replace(path)
    except OSError:
        pass  # the cache is an optimisation: a read-only cache folder must not fail the run


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " | ".join(lines[:3]) if lines else "(no message)"


def _naming(backend: str, error: UserError) -> UserError:
    """The error, prefixed with the backend unless it already names it."""
    message = str(error)
    return UserError(message if backend in message else f"backend {backend!r}: {message}")


# ------------------------------------------------------------------------------------------------------------
# Models that reason first: the reasoning runs free, the grammar and the stop sequences start after it.


@dataclass
class _Reasoning:
    """Where a chat reply stands with respect to a reasoning block (`completion.REASONING`), token by token:
    the block is open only where the reply's first token opens it, and ends at the token that closes it."""

    start_id: int
    end_id: int
    phase: Literal["first", "reasoning", "answer"] = "first"
    tokens: int = 0
    """Output tokens of the block so far (both markers included): the answer starts at this index."""

    def observe(self, token: int) -> None:
        if self.phase == "first":
            if token != self.start_id:
                self.phase = "answer"
                return
            self.phase = "reasoning"
        elif self.phase != "reasoning":
            return
        elif token == self.end_id:
            self.phase = "answer"
        self.tokens += 1


class _AfterReasoning:
    """A matcher for a model that may reason first: the first token may also open a reasoning block, which
    runs unconstrained to its closing token; the grammar's matcher starts after it (vLLM's structured outputs
    with a reasoning parser do the same). `_Reasoning.observe` moves the phase on after each `accept`."""

    __slots__ = ("_inner", "_reasoning")

    def __init__(self, inner: _Matcher, reasoning: _Reasoning) -> None:
        self._inner, self._reasoning = inner, reasoning

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        phase = self._reasoning.phase
        if phase == "reasoning":
            bitmask[row].fill_(-1)
            return
        self._inner.fill(bitmask, row)
        if phase == "first":
            word, bit = divmod(self._reasoning.start_id, 32)
            value = int(bitmask[row, word]) | (1 << bit)
            bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value  # int32 bits

    def accept(self, token: int) -> bool:
        phase = self._reasoning.phase
        if phase == "reasoning" or (phase == "first" and token == self._reasoning.start_id):
            return True
        return self._inner.accept(token)

    def error(self) -> str:
        return self._inner.error()


# ------------------------------------------------------------------------------------------------------------
# Decoding


@dataclass
class _Slot:
    """One sequence being decoded (mutable working state; the record it becomes is the frozen Generation)."""

    request: GenerationRequest
    prompt_ids: list[int]
    generator: torch.Generator | None
    matcher: _Matcher | None
    lead: str
    """The prompt's end, where a stop sequence at the completion's start begins (`completion.lead_of`)."""
    max_tokens: int
    out: list[int] = field(default_factory=list)
    first_s: float | None = None
    end_s: float | None = None
    mask_s: float = 0.0
    mask_unhidden_s: float = 0.0
    mask_steps: int = 0
    finish: FinishReason | None = None
    error: str | None = None
    reasoning: _Reasoning | None = None
    """For chat prompts to a model that may reason first: where the reply is (`_Reasoning`)."""


class _MaskFill:
    """One step's token masks: row i of `bitmask` for `slots[i]`, filled row by row by the mask threads while
    the forward pass runs, and by the decoding thread itself once the forward pass is done (`finish`).

    llguidance releases the GIL while it fills a row, so its rows fill in parallel and beside the forward
    pass (torch releases the GIL inside its kernels); XGrammar 0.2.8 holds it. A row is taken by exactly one
    thread. The decoding thread joining in means a
    mask thread that the OS has not scheduled yet (a shared, busy host) never makes a step wait longer than
    filling every row on the decoding thread would, and a fill longer than the forward pass gets every thread.
    """

    def __init__(self, bitmask: torch.Tensor, slots: list[_Slot]) -> None:
        self.bitmask = bitmask
        self.slots = slots
        self._rows = itertools.count()  # `next` on it is atomic: each row goes to one thread
        self._count_lock = threading.Lock()
        self._left = len(slots)
        self._done = threading.Lock()  # held until the last row is filled
        self._done.acquire()
        self._error: BaseException | None = None

    def work(self) -> None:
        """Fill rows until none is left to take; each row's fill time is charged to its sequence."""
        while (row := next(self._rows)) < len(self.slots):
            slot = self.slots[row]
            try:
                assert slot.matcher is not None
                started = time.perf_counter()
                slot.matcher.fill(self.bitmask, row)
                slot.mask_s += time.perf_counter() - started
            except BaseException as error:  # re-raised on the decoding thread by `finish`
                self._error = error
            with self._count_lock:
                self._left -= 1
                if not self._left:
                    self._done.release()

    def finish(self) -> None:
        """Fill the rows no mask thread has taken yet, wait for those being filled, raise a fill's error."""
        self.work()
        self._done.acquire()
        if self._error is not None:
            raise self._error


class _MaskThreads:
    """The threads that fill masks beside the forward pass.

    Plain threads woken by a lock, not an executor: a step hands over work with one lock release, and a
    thread holds the GIL only for a few lines around each row's fill.
    """

    def __init__(self, count: int) -> None:
        self._fill: _MaskFill | None = None
        self._closed = False
        self._wakes = [threading.Lock() for _ in range(count)]
        self._threads = [
            threading.Thread(target=self._run, args=(wake,), name="evalpipe-masks", daemon=True)
            for wake in self._wakes
        ]
        for wake, thread in zip(self._wakes, self._threads, strict=True):
            wake.acquire()
            thread.start()

    def _run(self, wake: threading.Lock) -> None:
        _no_wakeup_preemption()
        while True:
            wake.acquire()
            if self._closed:
                return
            fill = self._fill  # the newest fill: a thread woken late finds the older ones done
            if fill is not None:
                fill.work()

    def start(self, fill: _MaskFill) -> None:
        """Wake up to one thread per row."""
        self._fill = fill
        self._wake(len(fill.slots))

    def _wake(self, count: int) -> None:
        for wake in self._wakes[:count]:
            # Only this thread releases and only the mask thread acquires; an unlocked one is a wake-up the
            # thread has not taken yet, which will find the newest fill.
            if wake.locked():
                wake.release()

    def close(self) -> None:
        """Stop the threads. Waits for one still at work on a fill that no decoding thread waits for (after
        an error, or a batch left half-way): its matchers must not be freed under it. A fill started after
        this is done by its decoding thread alone."""
        self._closed = True
        self._wake(len(self._wakes))
        for thread in self._threads:
            thread.join()


def _no_wakeup_preemption() -> None:
    """Linux's SCHED_BATCH for the calling thread: the same share of the CPU as before, but being woken up no
    longer preempts the thread running on that core.

    Waking a mask thread at every step otherwise preempts the decoding thread, which on a busy host then waits
    out other processes' time slices: with 2 cores at a load average of about 9, starting a step's fill took
    the decoding thread 0.7-1.7 ms on average (median 0.02 ms), and 0.03-0.07 ms with SCHED_BATCH. Best
    effort: elsewhere, or where it is not allowed, the thread keeps the default policy.
    """
    if hasattr(os, "SCHED_BATCH"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


class HFEngine:
    """transformers generation with an llguidance / XGrammar / no token mask; see the module docstring."""

    PLANS_FROM_CONFIG: ClassVar[bool] = True
    """Requests are `plan_requests(...)`: see `evalpipe.engines.base.plans_from_config`."""
    OPTIONS: ClassVar[type[HFOptions]] = HFOptions
    """`--engine-arg` keys: device, dtype, batch_size, num_gpus (`evalpipe.engines.options`)."""

    @staticmethod
    def preflight(config: RunConfig, suite: Suite, joins_cluster: bool) -> None:
        """Before any replica starts: backends this engine has (outlines runs inside vLLM only)."""
        check_outlines("hf", suite, config.backends)
        check_chat_template(suite, config.models)
        for backend in config.backends:
            if backend not in SUPPORTED_BACKENDS:
                raise UserError(
                    f"engine 'hf' supports backends {', '.join(SUPPORTED_BACKENDS)}; not {backend!r}"
                )

    _mask_threads: _MaskThreads | None = None
    """Started by the first constrained batch, kept for the engine's life (starting threads on a busy host
    takes milliseconds: too much to pay per batch), stopped by `close`."""

    def __init__(
        self,
        config: RunConfig,
        suite: Suite,
        model: str,
        backend: str,
        *,
        batch_size: int | None = None,
        device: str | None = None,
    ) -> None:
        """`batch_size` and `device` override the config's `--engine-arg`s (for benchmarks)."""
        if backend not in SUPPORTED_BACKENDS:
            raise UserError(
                f"engine 'hf' supports backends {', '.join(SUPPORTED_BACKENDS)}; not {backend!r}"
                + (" (outlines takes no grammars; use it through vLLM)" if backend == "outlines" else "")
            )
        options = HFOptions.parse("hf", config.engine_args)
        if batch_size is not None:
            if batch_size < 1:
                raise UserError("batch_size must be at least 1")
            options = options.model_copy(update={"batch_size": batch_size})
        self._config, self._suite, self._model_name, self._backend = config, suite, model, backend
        self._batch_size = options.batch_size
        self._device = device or options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self._device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--engine-arg device={self._device}: torch sees no CUDA GPU on this machine")
        self._options = options.model_copy(update={"device": self._device})
        if self._device == "cpu":
            torch.set_num_threads(cpu_threads())
        self._constraint = self._load_constraint()
        self._effective = self._choose_backend()

        self._loaded = _acquire_model(model, self._device, options.dtype)
        self._closed = False
        try:
            self._setup()
            self._warm_up_s = self._warm_up()
        except BaseException:
            self.close()
            raise

    # -- setup ---------------------------------------------------------------------------------------------

    def _load_constraint(self) -> Constraint | None:
        if self._suite.constraint is None:
            if self._backend in GRAMMAR_BACKENDS:
                raise UserError(
                    f"backend {self._backend!r} needs a constraint, and suite {self._suite.name!r} has none"
                )
            return None
        from evalpipe.constraints import load_constraint

        return load_constraint(self._suite)

    def _choose_backend(self) -> str:
        """The backend actually used: `auto` picks XGrammar where it takes the constraint, else llguidance
        (vLLM's rule)."""
        if self._constraint is None or self._backend == "none":
            return "none"
        from evalpipe.constraints import validate

        candidate = self._backend
        if candidate == "auto":
            try:
                validate(self._constraint, "xgrammar")
                return "xgrammar"
            except UserError:
                candidate = "guidance"
        try:
            validate(self._constraint, candidate)
        except UserError as error:
            raise _naming(candidate, error) from None
        return candidate

    def _setup(self) -> None:
        tokenizer, network = self._loaded.tokenizer, self._loaded.model
        self._tokenizer = tokenizer
        self._model = network
        output = network.get_output_embeddings()
        self._logits_width = (
            int(output.weight.shape[0]) if output is not None else int(network.config.vocab_size)
        )
        # Token ids the tokenizer knows but the model cannot produce, or the reverse, are masked by width.
        self._mask_width = max(self._logits_width, len(tokenizer))
        self._eos_ids = self._find_eos_ids()
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self._eos_ids or [0])[0]
        )
        self._stops = stop_sequences(self._suite)
        chat = self._suite.prompt.format == "chat"
        self._reasoning_ids = reasoning_token_ids(tokenizer) if chat else None
        self._stop_window = max((len(s) for s in self._stops), default=0) + 1
        if self._suite.prompt.format not in ("raw", "chat"):
            raise UserError(f"suite prompt format {self._suite.prompt.format!r} is not raw or chat")
        if self._suite.prompt.format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"suite {self._suite.name!r} asks for chat prompts; model {self._model_name!r} has "
                "no chat template"
            )

        self._tokenizer_setup_s = 0.0
        self._grammar: _CompiledGrammar | None = None
        if self._effective == "none":
            return
        if not self._eos_ids:
            raise UserError(f"model {self._model_name!r} has no EOS token: a grammar could never end")
        assert self._constraint is not None
        started = time.perf_counter()
        if self._effective == "guidance":
            if not getattr(tokenizer, "is_fast", False):
                raise UserError("backend 'guidance' needs a fast (tokenizers) tokenizer; this model has none")
            lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self._mask_width, eos_token=self._eos_ids)
            self._tokenizer_setup_s = time.perf_counter() - started
            self._grammar = _GuidanceGrammar(self._constraint, lltok)
        else:
            info = xgrammar.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self._mask_width, stop_token_ids=self._eos_ids
            )
            self._tokenizer_setup_s = time.perf_counter() - started
            self._grammar = _XGrammarGrammar(self._constraint, info, self._tokenizer_key())

    def _warm_up(self) -> float:
        """One short untimed generation (with the grammar) before anything is measured: the first forward
        pass and the first masks pay for allocations and lazy set-up that no sample should be charged."""
        started = time.perf_counter()
        request = warmup_request(self._model_name, self._backend)
        slot = self._slot(request, self._prompt_ids(request.task))
        slot.max_tokens = WARMUP_MAX_TOKENS
        for _ in self._decode([slot]):
            pass
        return time.perf_counter() - started

    def _find_eos_ids(self) -> list[int]:
        ids: list[int] = []
        for value in (
            self._tokenizer.eos_token_id,
            getattr(self._model.generation_config, "eos_token_id", None),
        ):
            for token in value if isinstance(value, list) else [value]:
                if isinstance(token, int) and token not in ids and token < self._logits_width:
                    ids.append(token)
        return ids

    def _tokenizer_key(self) -> str:
        """The vocabulary, mask width and stop tokens: what a compiled XGrammar grammar depends on."""
        vocab = sorted(self._tokenizer.get_vocab().items(), key=lambda item: item[1])
        payload = json.dumps({"vocab": vocab, "width": self._mask_width, "eos": self._eos_ids})
        return hashlib.sha256(payload.encode()).hexdigest()

    # -- Engine protocol -----------------------------------------------------------------------------------

    def plan(self, tasks: Sequence[Task]) -> list[GenerationRequest]:
        return plan_requests(self._config, tasks, self._model_name, self._backend)

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[Generation]:
        for generation, _ in self.generate_with_ids(requests):
            yield generation

    def generate_with_ids(
        self, requests: Sequence[GenerationRequest]
    ) -> Iterator[tuple[Generation, list[int]]]:
        """`generate`, with each sample's output token ids (EOS included): for benchmarks and debugging."""
        prompts = {}
        for request in requests:
            if request.task.id not in prompts:
                prompts[request.task.id] = self._prompt_ids(request.task)
        # Similar lengths share a batch (less padding); a task's samples stay together (sorted is stable).
        order = sorted(requests, key=lambda r: len(prompts[r.task.id]))
        for start in range(0, len(order), self._batch_size):
            batch = order[start : start + self._batch_size]
            yield from self._decode([self._slot(r, prompts[r.task.id]) for r in batch])

    def describe(self) -> dict[str, Any]:
        grammar = self._grammar
        return {
            "engine": "hf",
            "model": self._model_name,
            "model_path": self._loaded.path,
            "backend": self._backend,
            "effective_backend": self._effective,
            "device": self._device,
            "dtype": str(self._model.dtype).removeprefix("torch."),
            "n_params": sum(p.numel() for p in self._model.parameters()),
            "vocab_size": self._logits_width,
            "batch_size": self._batch_size,
            # The options as used (device resolved); `dtype` above is what the weights are in.
            "options": self._options.model_dump(),
            "torch_threads": torch.get_num_threads() if self._device == "cpu" else None,
            "model_load_s": round(self._loaded.load_s, 3),
            "warm_up_s": round(self._warm_up_s, 3),
            "tokenizer_setup_s": round(self._tokenizer_setup_s, 3),
            "grammar_compile_s": None if grammar is None else round(grammar.compile_s, 4),
            "grammar_cache_hit": None if grammar is None else grammar.cache_hit,
            "grammar_cache_path": None if grammar is None else grammar.cache_path,
            "versions": package_versions("torch", "transformers", "llguidance", "xgrammar"),
        }

    def with_sampling(
        self, *, temperature: float, top_p: float, max_tokens: int, seed: int, stop: Sequence[str]
    ) -> Self:
        """This engine for other sampling settings and stop sequences (`evalpipe serve`: per request): the
        same loaded model and compiled grammar, so nothing is loaded or compiled again. The view owns
        neither: closing it releases nothing, and it keeps working if this engine is closed meanwhile."""
        view = copy.copy(self)
        view._config = self._config.model_copy(
            update={"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
        )
        view._stops = tuple(stop)
        view._stop_window = max((len(s) for s in view._stops), default=0) + 1
        view._closed = True
        return view

    def close(self) -> None:
        # Idempotent: the pipeline may close an engine that failed half-way, and close it again.
        if not self._closed:
            self._closed = True
            _release_model(self._loaded)
        self._grammar = None
        if self._mask_threads is not None:
            self._mask_threads.close()
            self._mask_threads = None

    # -- decoding ------------------------------------------------------------------------------------------

    def _prompt_ids(self, task: Task) -> list[int]:
        if self._suite.prompt.format == "chat":
            text = self._tokenizer.apply_chat_template(
                chat_messages(self._suite, task), tokenize=False, add_generation_prompt=True
            )
            return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self._tokenizer(task.prompt)["input_ids"])

    def _slot(self, request: GenerationRequest, prompt_ids: list[int]) -> _Slot:
        generator = None
        if self._config.temperature > 0:
            seed = sample_seed(self._config.seed, request.key.task_id, request.key.index)
            generator = torch.Generator(device=self._device).manual_seed(seed)
        matcher = self._grammar.matcher() if self._grammar is not None else None
        reasoning = None if self._reasoning_ids is None else _Reasoning(*self._reasoning_ids)
        if matcher is not None and reasoning is not None:
            matcher = _AfterReasoning(matcher, reasoning)
        lead = lead_of(self._suite, request.task)
        return _Slot(
            request, prompt_ids, generator, matcher, lead, self._config.max_tokens, reasoning=reasoning
        )

    def _decode(self, slots: list[_Slot]) -> Iterator[tuple[Generation, list[int]]]:
        """Decode one batch to the end, yielding each sequence as it finishes.

        With a grammar, each step's masks are filled on a mask thread while the forward pass of that step
        runs on this one: both need only the tokens chosen so far, which `_advance` has accepted into the
        matchers before the next step starts.
        """
        threads = self._mask_threads
        if threads is None and self._grammar is not None:
            threads = self._mask_threads = _MaskThreads(mask_threads())
        device = self._device
        longest = max(len(s.prompt_ids) for s in slots)
        input_ids = torch.tensor(
            [[self._pad_id] * (longest - len(s.prompt_ids)) + s.prompt_ids for s in slots], device=device
        )
        attention = torch.tensor(
            [[0] * (longest - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in slots], device=device
        )
        # Left padding: positions count real tokens only, so a padded row computes what it would alone.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        bitmask = self._new_bitmask(len(slots)) if self._grammar is not None else None
        active = list(slots)

        paused = 0.0  # time spent building records and suspended in `yield`: not decoding time

        def now() -> float:
            return time.perf_counter() - paused

        started = now()
        with torch.inference_mode():
            # The first masks (start states) are filled during the prefill.
            masks = None
            if threads is not None and bitmask is not None:
                masks = self._start_masks(threads, bitmask, active)
            while True:
                logits = (
                    self._model(
                        input_ids=input_ids,
                        attention_mask=attention,
                        position_ids=positions,
                        past_key_values=cache,
                        use_cache=True,
                        logits_to_keep=1,  # the prefill needs only the last position's logits
                    )
                    .logits[:, -1, : self._logits_width]
                    .float()
                )
                if masks is not None:
                    self._apply_masks(logits, masks)
                tokens = self._choose(logits, active)
                step_end = now()
                keep: list[int] = []
                for row, (slot, token) in enumerate(zip(active, tokens, strict=True)):
                    self._advance(slot, token, step_end)
                    if slot.finish is None:
                        keep.append(row)
                finished = [slot for slot in active if slot.finish is not None]
                for slot in finished:
                    # Building the record (decoding, the constraint check) and the consumer's time while we
                    # are suspended are not decoding time for the sequences still running.
                    suspended = time.perf_counter()
                    yield self._record(slot, started), slot.out
                    paused += time.perf_counter() - suspended
                if not keep:
                    return
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    attention, positions = attention[index], positions[index]
                    active = [active[row] for row in keep]
                next_ids = [active[row].out[-1] for row in range(len(active))]
                input_ids = torch.tensor(next_ids, device=device).unsqueeze(1)
                attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
                positions = positions[:, -1:] + 1
                # Started after the yields above, right before the forward pass: the fill is hidden behind
                # the forward pass only, never behind time the consumer holds us.
                if threads is not None and bitmask is not None:
                    masks = self._start_masks(threads, bitmask, active)

    def _new_bitmask(self, rows: int) -> torch.Tensor:
        shape = (rows, (self._mask_width + 31) // 32)
        # Pinned memory makes the copy to the GPU asynchronous; on CPU there is nothing to copy. The next
        # step's fill overwrites it only after `_choose` has synchronised with the GPU (`tolist`).
        return torch.full(shape, -1, dtype=torch.int32, pin_memory=self._device != "cpu")

    def _start_masks(
        self, threads: _MaskThreads, bitmask: torch.Tensor, active: list[_Slot]
    ) -> tuple[_MaskFill, float]:
        """Start filling the masks of `active` (every matcher has accepted its last token) on the mask
        threads; until `_apply_masks` returns, the matchers belong to the fill. Returns the fill and what
        starting it cost this thread."""
        started = time.perf_counter()
        fill = _MaskFill(bitmask, list(active))
        threads.start(fill)
        return fill, time.perf_counter() - started

    def _apply_masks(self, logits: torch.Tensor, started: tuple[_MaskFill, float]) -> None:
        """Complete the fill begun before the forward pass, apply all rows at once, and charge each sequence
        its own fill time plus a share of the apply (`mask_s`), and a share of what the forward pass did not
        hide (`mask_unhidden_s`: starting the fill, completing it after the forward pass, the apply)."""
        fill, handoff_s = started
        completing = time.perf_counter()
        fill.finish()
        applying = time.perf_counter()
        rows = fill.slots
        bitmask = fill.bitmask[: len(rows)]
        if logits.device.type == "cpu":
            xgrammar.apply_token_bitmask_inplace(
                logits, bitmask, vocab_size=self._logits_width, backend="cpu"
            )
        else:
            xgrammar.apply_token_bitmask_inplace(
                logits, bitmask.to(logits.device, non_blocking=True), vocab_size=self._logits_width,
                backend=_gpu_apply_backend(),
            )  # fmt: skip
        apply_s = time.perf_counter() - applying
        unhidden = (handoff_s + (applying - completing) + apply_s) / len(rows)
        for slot in rows:
            slot.mask_s += apply_s / len(rows)
            slot.mask_unhidden_s += unhidden
            slot.mask_steps += 1

    def _choose(self, logits: torch.Tensor, active: list[_Slot]) -> list[int]:
        """Greedy (temperature 0) or temperature / top-p sampling, each row with its own generator."""
        best = logits.max(dim=-1)
        dead = torch.isneginf(best.values).tolist()  # a mask that allows nothing
        if self._config.temperature == 0:
            chosen = best.indices.tolist()
        else:
            probs = torch.softmax(logits / self._config.temperature, dim=-1)
            if self._config.top_p < 1.0:
                probs = _top_p(probs, self._config.top_p)
            chosen = [
                int(torch.multinomial(probs[row], 1, generator=slot.generator).item())
                if not dead[row]
                else -1
                for row, slot in enumerate(active)
            ]
        return [-1 if dead[row] else int(token) for row, token in enumerate(chosen)]

    def _advance(self, slot: _Slot, token: int, now: float) -> None:
        """Append the chosen token and decide whether the sequence ends, and why."""
        if slot.first_s is None:
            slot.first_s = now
        if token < 0:
            slot.finish, slot.error, slot.end_s = "error", "the grammar allows no next token", now
            return
        slot.out.append(token)
        accepted = slot.matcher is None or slot.matcher.accept(token)
        answer_start = 0  # stop sequences count only in the answer after a reasoning block
        if slot.reasoning is not None:
            slot.reasoning.observe(token)
            answer_start = len(slot.out) if slot.reasoning.phase == "reasoning" else slot.reasoning.tokens
        if not accepted:
            assert slot.matcher is not None
            slot.finish, slot.error = "error", f"matcher rejected token {token}: {slot.matcher.error()}"
        elif token in self._eos_ids:
            slot.finish = "stop"  # under a grammar, the mask allows EOS only where the grammar accepts
        elif self._stops and answer_start < len(slot.out):
            # A stop sequence can only end in the newest token; decoding a short tail keeps the check cheap.
            start = max(len(slot.out) - self._stop_window, answer_start)
            tail = self._tokenizer.decode(slot.out[start:], skip_special_tokens=False)
            lead = slot.lead if len(slot.out) <= self._stop_window else ""
            if find_stop(tail, self._stops, lead) is not None:
                slot.finish = "stop"
        if slot.finish is None and len(slot.out) >= slot.max_tokens:
            slot.finish = "length"
        if slot.finish is not None:
            slot.end_s = now

    def _record(self, slot: _Slot, started: float) -> Generation:
        ids = slot.out[:-1] if slot.out and slot.out[-1] in self._eos_ids else slot.out
        raw = self._tokenizer.decode(ids, skip_special_tokens=False)
        completion = complete(self._suite, slot.request.task, raw)
        n_out = len(slot.out)
        ttft = None if slot.first_s is None else slot.first_s - started
        e2e = None if slot.end_s is None else slot.end_s - started
        tpot = (e2e - ttft) / (n_out - 1) if ttft is not None and e2e is not None and n_out > 1 else None
        grammar = self._grammar
        return Generation(
            key=slot.request.key,
            raw_text=raw,
            text=completion.code,
            finish_reason=slot.finish or "error",
            n_prompt_tokens=len(slot.prompt_ids),
            n_output_tokens=n_out,
            n_reasoning_tokens=slot.reasoning.tokens if slot.reasoning and slot.reasoning.tokens else None,
            ttft_s=ttft,
            tpot_s=tpot,
            e2e_s=e2e,
            grammar_compile_s=None if grammar is None else grammar.compile_s,
            grammar_cache_hit=None if grammar is None else grammar.cache_hit,
            mask_s_per_token=slot.mask_s / slot.mask_steps if slot.mask_steps else None,
            mask_unhidden_s_per_token=slot.mask_unhidden_s / slot.mask_steps if slot.mask_steps else None,
            constraint_satisfied=constraint_satisfied(self._constraint, completion),
            effective_backend=self._effective,
            error=slot.error or completion.error,
        )


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one), renormalised."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


@functools.cache
def _gpu_apply_backend() -> Literal["triton", "torch_native"]:
    """Triton when installed, else plain torch ops (never torch.compile: its first call takes minutes)."""
    return "triton" if importlib.util.find_spec("triton") is not None else "torch_native"
