"""The engine as the HTTP side sees it: submit, cancel, state, counts. Never blocks.

One generation thread owns MLX (model load included, since arrays and streams belong to
the thread that evaluates them); see batch_loop.py for what it runs. This side only
reserves capacity and posts messages to that thread's inbox.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api.errors import APIError
from ..metrics import ServerMetrics
from ..settings import ServerSettings
from .generation import GenerationFailed, GenerationHandle, SequenceSpec

if TYPE_CHECKING:
    from .group import Distributed

log = logging.getLogger("swan_serve.engine")


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class Admission:
    """Sequences counted from submission to their end, and the KV memory they may grow to:
    the backpressure bounds."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.kv_budget: int | None = None  # set once the model is loaded
        self._lock = threading.Lock()
        self._reserved = 0
        self.kv_reserved = 0

    def reserve(self, count: int, kv_bytes: int = 0) -> bool:
        with self._lock:
            if self._reserved + count > self.capacity:
                return False
            if self.kv_budget is not None and self.kv_reserved + kv_bytes > self.kv_budget:
                return False
            self._reserved += count
            self.kv_reserved += kv_bytes
            return True

    def release(self, count: int = 1, kv_bytes: int = 0) -> None:
        with self._lock:
            self._reserved -= count
            self.kv_reserved -= kv_bytes


# Called on the generation thread before loading: builds or finds the model directory
# (quantizing on a first load), reporting (phase, fraction) as it goes.
ModelProvider = Callable[[Callable[[str, float], None]], Path]


class Engine:
    def __init__(self, settings: ServerSettings, model_provider: ModelProvider | None = None,
                 distributed: Distributed | None = None):
        self.settings = settings
        # Set when this process is one rank of several (mlx.launch): see distributed.py.
        self.distributed = distributed
        if distributed is not None:
            distributed.engine = self
        self.state = EngineState.LOADING
        self.failure: str | None = None
        self._model_provider = model_provider
        self.model_dir: Path | None = settings.model_dir
        # What /health reports while loading: the phase and how far it is.
        self.loading_phase = "load"
        self.loading_progress = 0.0
        self.admission = Admission(settings.max_concurrency + settings.max_queue)
        self.metrics = ServerMetrics(
            queue_depth=lambda: self.waiting_count,
            active_sequences=lambda: self.active_count,
            prefix_cache_bytes=lambda: self.prefix_cache_bytes,
            prefix_cache_entries=lambda: self.prefix_cache_entries,
        )
        self.metrics.add_gauge("swan_kv_budget_bytes", "Memory the running batch's KV caches "
                               "and the prefix cache may use together.",
                               lambda: self.admission.kv_budget or 0)
        self.metrics.add_gauge("swan_kv_reserved_bytes", "KV memory the queued and running "
                               "requests may grow to (prompt + max_tokens).",
                               lambda: self.admission.kv_reserved)
        self.metrics.add_gauge("swan_kv_batch_bytes", "Bytes of the running batch's KV "
                               "caches.", lambda: self.kv_batch_bytes)
        self.metrics.add_gauge("swan_prefix_cache_disk_bytes", "Bytes of the prefix cache's "
                               "states on disk.", lambda: self.prefix_disk_bytes)
        self.metrics.add_gauge("swan_prefix_cache_disk_entries", "States the prefix cache "
                               "keeps on disk.", lambda: self.prefix_disk_entries)
        # Written by the generation thread after every step, read by /metrics.
        self.prefix_disk_bytes = 0
        self.prefix_disk_entries = 0
        self.kv_batch_bytes = 0
        self.active_count = 0
        self.waiting_count = 0
        self.prefix_cache_bytes = 0
        self.prefix_cache_entries = 0
        # Set once the model is loaded.
        self.tokenizer: Any = None
        self.prompt_encoder: Any = None  # prompt_tokens.PromptEncoder, once loaded
        self.context_length: int | None = None
        self.vocab_size = 0
        self.compute_dtype = ""
        self.sampling_defaults: dict[str, float] = {}
        self.kv_layout: Any = None  # kv_memory.KVLayout, once loaded
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_failure: Callable[[str], None] = lambda _message: None
        self._batch_loop: Any = None

    # ------------------------------------------------------------ lifecycle

    def start(self, on_failure: Callable[[str], None] | None = None) -> None:
        """Starts loading and serving on the generation thread; call from the event loop."""
        self._loop = asyncio.get_running_loop()
        if on_failure is not None:
            self._on_failure = on_failure
        self._thread = threading.Thread(target=self._thread_main, name="swan-generation",
                                        daemon=True)
        self._thread.start()

    def run_here(self, loop: asyncio.AbstractEventLoop, on_failure: Callable[[str], None]) -> None:
        """Loads and serves on the calling thread (a distributed follower rank: no HTTP)."""
        self._loop, self._on_failure = loop, on_failure
        self._thread_main()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = EngineState.STOPPED

    def _report_loading(self, phase: str, fraction: float) -> None:
        self.loading_phase, self.loading_progress = phase, fraction

    def _thread_main(self) -> None:
        if self._model_provider is not None:
            try:
                self.model_dir = self._model_provider(self._report_loading)
            except Exception as exc:  # the provider's errors are written for the user
                log.debug("preparing the model failed", exc_info=True)
                self._fail(str(exc))
                return
        self._report_loading("load", 0.0)
        try:
            from .batch_loop import BatchLoop
            from .model_loading import load_local_model

            if self.distributed is not None:
                self.distributed.agree_on_model(self.model_dir, self.settings)
            loaded = load_local_model(self.model_dir, self.settings.dtype,
                                      self.settings.max_model_len, parallel=self.distributed,
                                      chat_template=self.settings.chat_template)
        except Exception as exc:
            log.exception("could not load the model from %s", self.model_dir)
            self._fail(f"could not load the model from {self.model_dir}: {exc}")
            return
        if not self._plan_kv_memory(loaded.model):
            return
        self.tokenizer = loaded.tokenizer
        from ..chat.chat_features import ChatFeatures
        from ..chat.prompt_tokens import PromptEncoder

        self.prompt_encoder = PromptEncoder(loaded.tokenizer)

        self.chat_features = ChatFeatures.for_tokenizer(
            loaded.tokenizer, loaded.vocab_size, self.settings.tool_call_parser)
        # llguidance's view of the vocabulary takes ~1 s for 150k tokens: not on a request.
        threading.Thread(target=self.chat_features.warm_up, daemon=True).start()
        self.context_length = loaded.context_length
        self.vocab_size = loaded.vocab_size
        self.compute_dtype = loaded.compute_dtype
        self.sampling_defaults = loaded.sampling_defaults
        log.info(
            "model ready: %s (stored %s, computing in %s, context %s)",
            self.model_dir, loaded.model_dtype, loaded.compute_dtype,
            loaded.context_length,
        )
        assert self._loop is not None
        loop_class = BatchLoop
        if self.distributed is not None:
            from .distributed import FollowerLoop, LeaderLoop

            loop_class = LeaderLoop if self.distributed.rank == 0 else FollowerLoop
        batch_loop = self._batch_loop = loop_class(loaded, self, self._inbox, self._loop)
        self.state = EngineState.READY
        try:
            batch_loop.run()
        except Exception as exc:
            log.exception("the generation thread stopped")
            batch_loop.fail_all("The server's generation thread stopped.")
            self._fail(f"generation thread stopped: {exc}")

    def fail_everything(self, message: str, status: int) -> None:
        """From any thread, when the generation thread cannot go on (a distributed group
        that broke): new requests get 503, the queued and running ones this error."""
        self.failure, self.state = message, EngineState.FAILED
        batch_loop = self._batch_loop
        if batch_loop is not None:
            batch_loop.fail_handles(GenerationFailed(message, status=status))
    def _plan_kv_memory(self, model: Any) -> bool:
        """Learns the caches' layout and sets the KV budget; False when --kv-bits cannot
        apply to this model (the server then stops with the reason)."""
        from ..prefix.kv_state import free_memory_bytes
        from .kv_memory import default_budget, measure_layout

        try:
            self.kv_layout = measure_layout(model, self.settings.kv_bits,
                                            self.settings.kv_group_size)
        except ValueError as exc:
            self._fail(f"--kv-bits {self.settings.kv_bits}: {exc}")
            return False
        budget = self.settings.max_kv_bytes or default_budget(free_memory_bytes())
        self.admission.kv_budget = budget
        log.info("KV memory: %.1f MiB for the running batch and the prefix cache; %s, "
                 "%d bytes per token", budget / 2**20,
                 f"{self.settings.kv_bits}-bit (group {self.kv_layout.group_size})"
                 if self.settings.kv_bits else "float", self.kv_layout.footprint.per_token)
        return True

    def kv_need(self, spec: SequenceSpec) -> int:
        """Bytes of KV cache `spec`'s sequence can grow to."""
        return self.kv_layout.footprint.bytes_for(len(spec.prompt) + spec.max_tokens)

    def _fail(self, message: str) -> None:
        self.failure = message
        self.state = EngineState.FAILED
        self._on_failure(message)

    # ------------------------------------------------------------ requests

    def submit(
        self, request_id: str, specs: list[SequenceSpec], prompt_tokens: int
    ) -> GenerationHandle:
        """Queues a request's sequences; raises 503 while loading, 429 when full."""
        if self.state is not EngineState.READY:
            status = "loading" if self.state is EngineState.LOADING else "unavailable"
            raise APIError(503, f"The model is {status}; retry shortly.", code="model_not_ready",
                           headers={"Retry-After": "1"})
        if len(specs) > self.admission.capacity:
            raise APIError(400, f"n is larger than the server's capacity "
                           f"({self.admission.capacity} sequences).", param="n",
                           code="invalid_value")
        need = sum(self.kv_need(spec) for spec in specs)
        budget = self.admission.kv_budget
        if budget is not None and need > budget:
            raise APIError(400, f"This request can grow to {need / 2**20:.1f} MiB of KV cache "
                           f"(prompt and max_tokens), more than the server's "
                           f"{budget / 2**20:.1f} MiB; shorten it or lower max_tokens.",
                           code="context_length_exceeded")
        if not self.admission.reserve(len(specs), need):
            raise APIError(429, "The server is at capacity; retry shortly.",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        handle = GenerationHandle(request_id, specs, prompt_tokens, asyncio.get_running_loop())
        self._inbox.put(("submit", handle))
        return handle

    def cancel(self, handle: GenerationHandle) -> None:
        """Frees the request's sequences at the generation thread's next step."""
        if not (handle.cancelled or handle.done):
            handle.cancelled = True
            self._inbox.put(("cancel", handle))
