"""Where the numpy model's weights come from: a whole in-memory dict, or the checkpoint.

`NpModel` (npmodel.py) asks for weights a layer at a time, the embedding by rows
and the output head by row blocks, so the same forward pass runs on either:

- `WholeWeights`: dense float32 copies of every weight (mlx_lm's loaded model,
  dequantized where quantized: the only route for quantized MLX checkpoints).
- `StreamedWeights`: read on demand from a safetensors checkpoint with our own
  reader (sources/checkpoint.py); a decoder layer is read when the forward pass
  reaches it and dropped when it leaves, the embedding only at the rows of the
  tokens, and the head block by block, so at most about one layer is held in
  float32 whatever the model's size.

Both take `overrides`: weight key -> array or function applied when that weight
is read, e.g. a quantize-dequantize probe for class calibration (sensitivity.py),
so swapping weights never needs the model in memory. A function override must
act row by row (each output row depends only on the same input row, as group
quantization along the input axis does): the embedding and the head are read
in row blocks. For the dense Llama/Qwen2/Qwen3/Mistral families the HF names
are the MLX paths; mlx_lm's sanitize only drops `rotary_emb.inv_freq` (never
read here) and, for tied embeddings, `lm_head.weight` (tied models use the
embedding as the head here too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from .sources.checkpoint import Checkpoint

Override = np.ndarray | Callable[[np.ndarray], np.ndarray]
EMBED = "model.embed_tokens.weight"
_HEAD_BLOCK_ELEMENTS = 1 << 24  # 64 MB of float32 head rows per block
# the per-layer tensors the forward pass reads (q/k norms only exist in Qwen3)
LAYER_TENSORS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    # Qwen2's q/k/v biases (and Llama's optional attention_bias / mlp_bias)
    *(f"{m}.bias" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                            "mlp.down_proj")),
)


def _apply(value: np.ndarray, override: Override | None, rows: slice | np.ndarray | None
           ) -> np.ndarray:
    """`value` (rows `rows` of the weight, or all of it) with the override applied."""
    if override is None:
        return value
    if callable(override):
        return np.asarray(override(value), dtype=np.float32)
    return override if rows is None else override[rows]


class Weights:
    """The interface NpModel reads through; subclasses say where bytes come from."""

    tied: bool

    def __init__(self, tied: bool):
        self.tied = tied
        self.overrides: dict[str, Override] = {}
        self.block_elements = _HEAD_BLOCK_ELEMENTS  # bound on one head block's size

    # -- provided by subclasses -------------------------------------------------
    def __contains__(self, key: str) -> bool:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def _read_rows(self, key: str, rows: slice | np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------
    def get(self, key: str) -> np.ndarray:
        value, override = self._read(key), self.overrides.get(key)
        if not callable(override) or value.ndim < 2:
            return _apply(value, override, None)
        # a row-wise function, applied a row block at a time: a quantizer's temporaries
        # are then a block's, not several copies of a 12288 x 4096 matrix
        out = np.empty(value.shape, np.float32)
        step = max(1, self.block_elements // value.shape[-1])
        for r0 in range(0, value.shape[0], step):
            out[r0:r0 + step] = override(value[r0:r0 + step])
        return out

    def rows(self, key: str, rows: slice | np.ndarray) -> np.ndarray:
        return _apply(self._read_rows(key, rows), self.overrides.get(key), rows)

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Every tensor the forward pass reads in decoder layer i, keyed by full name."""
        names = (f"model.layers.{i}.{n}" for n in LAYER_TENSORS)
        return {k: self.get(k) for k in names if k in self}

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Embedding rows of `tokens` (any shape): only the distinct rows are read."""
        ids, inverse = np.unique(tokens, return_inverse=True)
        return self.rows(EMBED, ids)[inverse.reshape(tokens.shape)]

    def head_key(self) -> str:
        return EMBED if self.tied or "lm_head.weight" not in self else "lm_head.weight"

    def row_blocks(self, key: str) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) of a 2-D weight, a bounded block at a time."""
        rows, cols = self.shape(key)
        step = max(1, self.block_elements // cols)
        for r0 in range(0, rows, step):
            yield r0, self.rows(key, slice(r0, min(rows, r0 + step)))


class WholeWeights(Weights):
    """Every weight held in memory as float32 (from mlx_lm's loaded model)."""

    def __init__(self, weights: dict[str, np.ndarray], tied: bool):
        super().__init__(tied)
        self.w = weights

    def __contains__(self, key: str) -> bool:
        return key in self.w

    def shape(self, key: str) -> tuple[int, ...]:
        return self.w[key].shape

    def _read(self, key: str) -> np.ndarray:
        return self.w[key]

    def _read_rows(self, key: str, rows: slice | np.ndarray) -> np.ndarray:
        return self.w[key][rows]


class StreamedWeights(Weights):
    """Weights read from a safetensors checkpoint when asked for, never kept."""

    def __init__(self, ckpt: Checkpoint, tied: bool):
        super().__init__(tied)
        self.ckpt = ckpt

    def __contains__(self, key: str) -> bool:
        return key in self.ckpt

    def shape(self, key: str) -> tuple[int, ...]:
        return self.ckpt.info(key).shape

    def _read(self, key: str) -> np.ndarray:
        return self.ckpt.read(key)

    def _read_rows(self, key: str, rows: slice | np.ndarray) -> np.ndarray:
        return self.ckpt.read_rows(key, rows)
