"""This process's place in a distributed group (mlx.launch): who it is, what it agrees
with the other ranks before serving, what it reports of itself, how it ends.

Imported before the model loads (the command line decides from it whether this process
serves HTTP), so it keeps to mlx.core: mlx_lm and the engine come later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .collectives import Collectives, GroupFailed, count_all_sums

if TYPE_CHECKING:
    import mlx.nn as nn

    from ..settings import ServerSettings
    from .engine import Engine

log = logging.getLogger("swan_serve.distributed")

PARALLEL_MODES = ("tensor", "pipeline")
# Rank 0 sends an empty turn at least this often while idle, so that a silent rank is
# noticed by the others' watchdogs even when no request comes.
HEARTBEAT_SECONDS = 1.0
# How often the ranks report their memory to rank 0 (for /health and /metrics).
MEMORY_REPORT_SECONDS = 2.0
# After a fatal error rank 0 keeps answering 503 this long before it exits.
_FATAL_GRACE_SECONDS = 1.0


@dataclass
class Distributed:
    """This process's place in the group, and what /health and /metrics show of it."""

    collectives: Collectives
    mode: str
    step_timeout: float
    # Per rank: {"peak_rss_bytes", "active_bytes"}, refreshed every MEMORY_REPORT_SECONDS.
    rank_memory: list[dict[str, int]] = field(default_factory=list)
    engine: Engine | None = None
    _fatal_once: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rank(self) -> int:
        return self.collectives.rank

    @property
    def size(self) -> int:
        return self.collectives.size

    # ------------------------------------------------------------ before serving

    def agree_on_model(self, model_dir: Path, settings: ServerSettings) -> None:
        """Every rank must serve the same build with the same batch settings."""
        self.collectives.agree(
            "the model or the serving settings",
            model_identity(model_dir) + "\0" + lockstep_settings(settings, self.mode),
            "every rank must serve the same build (same MODEL, --revision, --recipe, "
            "--target-bpw, swan-serve version) with the same flags")

    def shard(self, model: nn.Module) -> None:
        group = self.collectives.group
        kind = type(model).__module__.rsplit(".", 1)[-1]
        if self.mode == "tensor":
            if not hasattr(model, "shard"):
                raise GroupFailed(f"mlx-lm cannot shard this architecture ({kind}) by tensor; "
                                  "try --parallel pipeline")
            model.shard(group)
        else:
            inner = getattr(model, "model", None)
            if not hasattr(inner, "pipeline"):
                raise GroupFailed(f"mlx-lm has no pipeline for this architecture ({kind}); "
                                  "try --parallel tensor")
            inner.pipeline(group)

    def agree_dtype(self, name: str) -> str:
        """Rank 0's compute dtype (each machine's probe may time differently)."""
        return self.collectives.broadcast(name if self.collectives.leader else None)

    # ------------------------------------------------------------ memory of every rank

    def report_memory(self) -> None:
        kib = [_peak_rss_bytes() >> 10, mx.get_active_memory() >> 10]
        self.rank_memory = [{"peak_rss_bytes": peak << 10, "active_bytes": active << 10}
                            for peak, active in self.collectives.gather_ints(kib)]

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.size, "parallel": self.mode,
                "ranks": [{"rank": r, **m} for r, m in enumerate(self.rank_memory)]}

    def prometheus(self) -> str:
        """The group's lines for /metrics (text exposition format)."""
        lines = [
            "# HELP swan_distributed_world_size Ranks serving this model.",
            "# TYPE swan_distributed_world_size gauge",
            f'swan_distributed_world_size{{parallel="{self.mode}"}} {self.size}',
            "# HELP swan_distributed_all_sum_bytes_total Bytes rank 0 put into all_sum "
            "collectives (control messages, sampled tokens, the sharded layers).",
            "# TYPE swan_distributed_all_sum_bytes_total counter",
            f"swan_distributed_all_sum_bytes_total {self.collectives.bytes_sent}",
            "# HELP swan_distributed_all_sums_total all_sum collectives rank 0 entered.",
            "# TYPE swan_distributed_all_sums_total counter",
            f"swan_distributed_all_sums_total {self.collectives.collectives}",
            "# HELP swan_rank_memory_bytes Each rank's memory (peak RSS; MLX active).",
            "# TYPE swan_rank_memory_bytes gauge",
        ]
        for rank, memory in enumerate(self.rank_memory):
            for kind, value in memory.items():
                lines.append(f'swan_rank_memory_bytes{{rank="{rank}",kind="{kind}"}} {value}')
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ the end

    def fatal(self, message: str) -> None:
        """Ends this rank (and so the group) with one line; rank 0 answers 503 meanwhile."""
        if not self._fatal_once.acquire(blocking=False):
            return
        print(f"swan-serve: error: rank {self.rank}: {message}", file=sys.stderr, flush=True)
        if self.engine is not None and self.collectives.leader:
            self.engine.fail_everything(f"The distributed group failed: {message}", status=503)
            time.sleep(_FATAL_GRACE_SECONDS)
        logging.shutdown()
        os._exit(1)


def init_group(parallel: str | None, step_timeout: float) -> Distributed | None:
    """The group mlx.launch set up, or None for a single process."""
    group = mx.distributed.init()
    if group.size() < 2:
        return None
    collectives = Collectives(group)
    count_all_sums(collectives)
    return Distributed(collectives, parallel or "tensor", step_timeout)


def model_identity(model_dir: Path) -> str:
    """The config, the quantization plan, every weight file's name, size and header
    (tensor names, dtypes, shapes, offsets) and _SAMPLES evenly spaced pieces of its data:
    a few MiB read however large the model, and different for another checkpoint of the
    same shapes (another seed, a fine-tune)."""
    digest = hashlib.sha256()
    for name in ("config.json", "swan-plan.json"):
        path = model_dir / name
        if path.exists():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            digest.update(f"{path.name}\0{size}\0".encode() + fh.read(length))
            data = 8 + length
            for i in range(_SAMPLES):
                fh.seek(data + (size - data) * i // _SAMPLES)
                digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()


_SAMPLES, _SAMPLE_BYTES = 64, 4096


def lockstep_settings(settings: ServerSettings, mode: str) -> str:
    """The settings every rank's BatchLoop must share to take the same steps."""
    fields = ("max_concurrency", "prefill_step_size", "max_model_len", "dtype")
    return json.dumps([mode, *(getattr(settings, f) for f in fields)])


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


# ------------------------------------------------------------------ watchdog


class Watchdog:
    """Calls `on_silence` once if no `beat()` comes for `timeout` seconds: a rank that
    stops answering leaves the others blocked inside a collective, which nothing else
    can interrupt."""

    def __init__(self, timeout: float, on_silence: Callable[[str], None]):
        self._timeout, self._on_silence = timeout, on_silence
        self._last = time.monotonic()
        threading.Thread(target=self._watch, name="swan-watchdog", daemon=True).start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while True:
            silent = time.monotonic() - self._last
            if silent > self._timeout:
                self._on_silence(f"no step completed for {silent:.0f} s (step timeout "
                                 f"{self._timeout:g} s): another rank died or stopped answering")
                return
            time.sleep(min(0.5, self._timeout / 4))


