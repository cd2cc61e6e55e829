"""Streaming SWAN analysis: a safetensors checkpoint -> Manifest, one tensor at a time.

For each quantizable matrix (a 2-D weight, or one expert of a stacked [E, out, in]
weight), nothing larger than a row block (`block_elements`) is ever in memory:

1. one streamed pass over all rows: pooled power sums (excess kurtosis, extremes)
   and the exact energy of every row and column;
2. a seeded uniform sample of whole rows (`error_sample_elements`): for every
   candidate (bits, group) the MLX affine quantize-dequantize error and the output
   noise (median over seeded unit probes x of ||E x|| / ||W x||); affine groups
   run along rows, so row sampling gives unbiased error sums;
3. the spectral concentration of a seeded, stratified, aspect-preserving sub-block
   (smaller side `spectral_block`; exact when the matrix is no larger), built from
   the row/column energies of pass 1 (see metrics.py).

Stacked experts are analysed expert by expert: all of them when E <= expert_sample,
else a seeded sample of expert_sample. The stack gets one set of metrics (pooled
moments and error sums, mean spectral concentration) and keeps the per-expert
spread. Everything is seeded by (seed, tensor name, expert) and tensors are
processed in sorted order (in parallel, collected in order), so the manifest is
byte-identical from run to run.

API: analyze_checkpoint(model_dir, config=None, progress=True) -> Manifest
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from swan_serve import __version__

from . import metrics
from .affine import bits_per_weight
from .blas_threads import blas_threads
from .manifest import (
    Candidate,
    ExpertSpread,
    Manifest,
    Metrics,
    Sample,
    Scores,
    Source,
    Spread,
    Summary,
    TensorRecord,
    sig,
)
from .names import Classification, classify
from .progress import ProgressCallback, phase_progress
from .scoring import AnalysisConfig, AnalysisSettings, load_config, score
from .sources.checkpoint import Checkpoint, TensorInfo, open_checkpoint

ALGORITHM_REVISION = 1
ANALYZER_VERSION = f"{__version__}+swan{ALGORITHM_REVISION}"
SCALE_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}

ReadRows = Callable[[slice | np.ndarray], np.ndarray]
Tick = Callable[[int], None]


@dataclass(frozen=True)
class MatrixResult:
    """Everything measured on one 2-D matrix, before pooling and rounding."""

    moments: metrics.Moments
    low: float  # smallest value
    high: float  # largest value
    spectral: float
    spectral_block: tuple[int, int]
    error_sums: list[metrics.ErrorSums]
    row_kurtosis: np.ndarray
    error_rows: int
    rows: int


def _seed_of(seed: int, name: str, expert: int | None) -> list[int]:
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return [seed, digest, 0 if expert is None else expert + 1]


@lru_cache(maxsize=64)
def _probes(in_dim: int, count: int, seed: int) -> np.ndarray:
    return metrics.unit_probes(in_dim, count, seed)


def _stream_stats(
    read_rows: ReadRows, shape: tuple[int, int], block_elements: int, tick: Tick
) -> tuple[metrics.Moments, np.ndarray, np.ndarray, float, float]:
    rows, cols = shape
    step = max(1, block_elements // cols)
    moments = metrics.Moments()
    row_energy = np.empty(rows, dtype=np.float64)
    col_energy = np.zeros(cols, dtype=np.float64)
    low, high, shift = math.inf, -math.inf, None
    for start in range(0, rows, step):
        block = read_rows(slice(start, start + step))
        if shift is None:
            shift = metrics.choose_shift(block)
        block_moments, block_rows, block_cols = metrics.block_stats(block, shift)
        moments = moments + block_moments
        row_energy[start : start + block.shape[0]] = block_rows
        col_energy += block_cols
        low, high = min(low, float(block.min())), max(high, float(block.max()))
        tick(block.shape[0])
    return moments, row_energy, col_energy, low, high


def _spectral(
    read_rows: ReadRows,
    shape: tuple[int, int],
    row_energy: np.ndarray,
    col_energy: np.ndarray,
    settings: AnalysisSettings,
    rng: np.random.Generator,
) -> tuple[float, tuple[int, int]]:
    block_rows, block_cols = metrics.sub_block_shape(shape, settings.spectral_block)
    rows, row_w = metrics.stratified_indices(row_energy, block_rows, rng)
    cols, col_w = metrics.stratified_indices(col_energy, block_cols, rng)
    sub = np.empty((rows.size, cols.size), dtype=np.float32)
    step = max(1, settings.block_elements // shape[1])
    for start in range(0, rows.size, step):
        chunk = rows[start : start + step]
        sub[start : start + chunk.size] = read_rows(chunk)[:, cols]
    sub *= row_w[:, None]
    sub *= col_w[None, :]
    return metrics.spectral_concentration(sub, settings.spectral_fraction), sub.shape


def analyse_matrix(
    read_rows: ReadRows,
    shape: tuple[int, int],
    candidates: list[tuple[int, int]],
    config: AnalysisConfig,
    scale_dtype: str,
    rng: np.random.Generator,
    tick: Tick,
    importance: np.ndarray | None = None,
) -> MatrixResult:
    """The four metrics' raw material for one [out, in] matrix read through read_rows."""
    settings = config.analysis
    rows, cols = shape
    moments, row_energy, col_energy, low, high = _stream_stats(
        read_rows, shape, settings.block_elements, tick
    )
    n_sample = min(rows, max(1, math.ceil(settings.error_sample_elements / cols)))
    sample_rows = np.sort(rng.choice(rows, size=n_sample, replace=False))
    sample = read_rows(sample_rows)
    probes = _probes(cols, settings.probes, settings.seed)
    sums = metrics.candidate_sums(sample, candidates, probes, scale_dtype, importance)
    row_kurtosis = metrics.row_excess_kurtosis(sample)
    del sample
    spectral, block = _spectral(read_rows, shape, row_energy, col_energy, settings, rng)
    return MatrixResult(moments, low, high, spectral, block, sums, row_kurtosis, n_sample, rows)


def allowed_candidates(config: AnalysisConfig, in_dim: int, min_bits: int) -> list[tuple[int, int]]:
    return [(b, g) for b, g in config.candidates() if in_dim % g == 0 and b >= min_bits]


def reference_index(config: AnalysisConfig, candidates: list[tuple[int, int]]) -> int:
    """The candidate closest to the configured reference (exact match when allowed)."""
    ref = config.analysis.reference
    return min(
        range(len(candidates)),
        key=lambda i: (abs(candidates[i][0] - ref.bits), abs(candidates[i][1] - ref.group_size)),
    )


def _experts_to_analyse(info: TensorInfo, config: AnalysisConfig) -> list[int]:
    total = info.shape[0]
    count = config.analysis.expert_sample
    if total <= count:
        return list(range(total))
    rng = np.random.default_rng(_seed_of(config.analysis.seed, info.name, None) + [1])
    return sorted(int(e) for e in rng.choice(total, size=count, replace=False))


def _max_abs_z(moments: metrics.Moments, low: float, high: float) -> float:
    std = math.sqrt(moments.variance)
    if std == 0.0:
        return 0.0
    return max(abs(high - moments.mean), abs(low - moments.mean)) / std


def _tensor_metrics(
    results: list[MatrixResult], ref: int, config: AnalysisConfig
) -> tuple[Metrics, list[metrics.ErrorSums]]:
    moments = metrics.Moments()
    for r in results:
        moments = moments + r.moments
    pooled = [
        sum((r.error_sums[i] for r in results[1:]), results[0].error_sums[i])
        for i in range(len(results[0].error_sums))
    ]
    row_kurt = np.concatenate([r.row_kurtosis for r in results])
    m = Metrics(
        spectral_concentration=sig(float(np.mean([r.spectral for r in results]))),
        excess_kurtosis=sig(moments.excess_kurtosis),
        noise_amplification=sig(pooled[ref].noise_amplification),
        rel_rms_error=sig(pooled[ref].rel_rms_error),
        row_kurtosis_median=sig(float(np.median(row_kurt))),
        row_kurtosis_max=sig(float(np.max(row_kurt))),
        max_abs_z=sig(
            _max_abs_z(moments, min(r.low for r in results), max(r.high for r in results))
        ),
    )
    return m, pooled


def _spread(values: list[float]) -> Spread:
    return Spread(min=sig(min(values)), mean=sig(float(np.mean(values))), max=sig(max(values)))


def _composite(m: Metrics, config: AnalysisConfig) -> tuple[Scores, float]:
    """Scores and composite of rounded metrics, themselves rounded."""
    scores, composite = score(
        m.spectral_concentration,
        m.excess_kurtosis,
        m.noise_amplification,
        m.rel_rms_error,
        config,
    )
    rounded = Scores(**{k: sig(v) for k, v in scores.model_dump().items()})
    return rounded, sig(composite)


def _row_reader(ckpt: Checkpoint, name: str, expert: int | None) -> ReadRows:
    if expert is None:
        return lambda rows: ckpt.read_rows(name, rows)
    return lambda rows: ckpt.read_expert_rows(name, expert, rows)


def _expert_spread(
    total: int, experts: list[int], results: list[MatrixResult], ref: int, config: AnalysisConfig
) -> ExpertSpread:
    per_expert = [_tensor_metrics([r], ref, config)[0] for r in results]
    return ExpertSpread(
        total=total,
        analysed=experts,
        spectral_concentration=_spread([x.spectral_concentration for x in per_expert]),
        excess_kurtosis=_spread([x.excess_kurtosis for x in per_expert]),
        rel_rms_error=_spread([x.rel_rms_error for x in per_expert]),
        composite=_spread([_composite(x, config)[1] for x in per_expert]),
    )


def analyse_tensor(
    ckpt: Checkpoint, info: TensorInfo, cls: Classification, config: AnalysisConfig, tick: Tick,
    moments: dict[str, np.ndarray] | None = None,
) -> TensorRecord:
    """The manifest record of one tensor (streamed; stacked experts one at a time).
    moments (an imatrix, by HF name): weight the reconstruction error's input channels."""
    base = dict(
        name=info.name,
        shape=list(info.shape),
        dtype=info.dtype,
        params=info.numel,
        tensor_class=cls.tensor_class.value,
        role=cls.role,
        stack_group=cls.stack_group,
    )
    if not cls.quantizable:
        return TensorRecord(**base, quantizable=False, reason=cls.reason)
    settings = config.analysis
    experts = _experts_to_analyse(info, config) if cls.stacked_experts else [None]
    min_bits = 3 if info.numel < settings.tiny_params else 2  # tiny tensors never get 2 bits
    candidates = allowed_candidates(config, info.shape[-1], min_bits)
    ref = reference_index(config, candidates)
    shape = (info.shape[-2], info.shape[-1])
    row_bytes = info.shape[-1] * (info.nbytes // info.numel)
    results = [
        analyse_matrix(
            _row_reader(ckpt, info.name, expert),
            shape,
            candidates,
            config,
            SCALE_DTYPES[info.dtype],
            np.random.default_rng(_seed_of(settings.seed, info.name, expert)),
            lambda rows: tick(rows * row_bytes),
            _importance(moments, info.name, expert),
        )
        for expert in experts
    ]
    m, pooled = _tensor_metrics(results, ref, config)
    scores, composite = _composite(m, config)
    return TensorRecord(
        **base,
        quantizable=True,
        min_bits=min_bits,
        metrics=m,
        scores=scores,
        composite=composite,
        candidates=[
            Candidate(
                bits=b,
                group_size=g,
                bpw=sig(bits_per_weight(b, g)),
                rel_rms_error=sig(s.rel_rms_error),
                noise_amplification=sig(s.noise_amplification),
            )
            for (b, g), s in zip(candidates, pooled, strict=True)
        ],
        sample=Sample(
            error_rows=results[0].error_rows,
            rows=results[0].rows,
            spectral_block=results[0].spectral_block,
            spectral_exact=tuple(results[0].spectral_block) == shape,
        ),
        experts=(
            _expert_spread(info.shape[0], experts, results, ref, config)
            if cls.stacked_experts
            else None
        ),
    )


def _importance(moments: dict[str, np.ndarray] | None, name: str, expert: int | None
                ) -> np.ndarray | None:
    m = None if moments is None else moments.get(name)
    if m is None:
        return None
    m = np.asarray(m, dtype=np.float64)
    return m[expert or 0] if m.ndim == 2 else m


def bytes_to_read(info: TensorInfo, cls: Classification, config: AnalysisConfig) -> int:
    """What the analysis streams of this tensor (the progress bar's unit)."""
    if not cls.quantizable:
        return 0
    if cls.stacked_experts:
        return info.nbytes // info.shape[0] * len(_experts_to_analyse(info, config))
    return info.nbytes


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.0, 0.1, 0.5, 0.9, 1.0])
    return {k: sig(v) for k, v in zip(("min", "p10", "p50", "p90", "max"), q, strict=True)}


def build_manifest(
    ckpt: Checkpoint, config: AnalysisConfig, records: list[TensorRecord]
) -> Manifest:
    quantizable = [r for r in records if r.quantizable]
    architectures = ckpt.config.get("architectures") or []
    return Manifest(
        analyzer_version=ANALYZER_VERSION,
        source=Source(
            model_dir=ckpt.root.resolve().name,
            model_type=ckpt.config.get("model_type"),
            architectures=[str(a) for a in architectures],
            fingerprint=ckpt.fingerprint(),
            files=list(ckpt.files),
            total_bytes=sum(t.nbytes for t in ckpt.tensors),
            tensor_count=len(ckpt.tensors),
        ),
        config=config.as_dict(),
        config_hash=config.digest(),
        summary=Summary(
            quantizable=len(quantizable),
            kept_float=len(records) - len(quantizable),
            quantizable_params=sum(r.params for r in quantizable),
            float_params=sum(r.params for r in records if not r.quantizable),
            composite_quantiles=_quantiles([r.composite for r in quantizable]),
        ),
        tensors=records,
    )


def analyze_checkpoint(
    model_dir: str | os.PathLike,
    config: AnalysisConfig | None = None,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
    moments: dict[str, np.ndarray] | None = None,
) -> Manifest:
    """Analyse every tensor of the checkpoint in model_dir (raises CheckpointError).

    `moments` (an imatrix, by HF weight name) weights each input channel of the
    reconstruction error (metric 4, rel_rms_error) by its second moment.

    `progress` shows a bar (or log lines when not on a terminal); `on_progress` gets
    ("analyze", fraction done) as bytes are analysed."""
    config = config or load_config()
    ckpt = open_checkpoint(model_dir)
    work = [(info, classify(info.name, info.shape)) for info in ckpt.tensors]
    total = sum(bytes_to_read(info, cls, config) for info, cls in work)
    lock = threading.Lock()
    with phase_progress("analyze", total, "B", progress, on_progress) as bar:
        done = [0]

        def tick(nbytes: int) -> None:
            with lock:
                bar.update(nbytes)

        def run(item: tuple[TensorInfo, Classification]) -> TensorRecord:
            record = analyse_tensor(ckpt, item[0], item[1], config, tick, moments)
            with lock:
                done[0] += 1
                bar.set_postfix(f"{done[0]}/{len(work)} tensors")
            return record

        # `workers` tensors in parallel, one BLAS thread each (see blas_threads.py).
        with blas_threads(1), ThreadPoolExecutor(config.analysis.workers) as pool:
            records = list(pool.map(run, work))
    return build_manifest(ckpt, config, records)
