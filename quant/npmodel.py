"""A numpy forward pass of dense Llama-family models (Llama, Qwen2/3, Mistral).

MLX's CPU build multiplies matrices ~30x slower than numpy's BLAS, so the work
that runs the model during quantization (self-generated text, input moments,
class calibration) and the quality bench's evaluation run here when the device
is a CPU. Weights come through npweights.py: `NpModel.stream` reads a float
safetensors checkpoint layer by layer (about one decoder layer in float32 at a
time: what the quantizer's output objective uses, so a model far bigger than
memory can be measured), `NpModel.load` takes mlx_lm's own loaded model whole
(quantized modules dequantized: any checkpoint mlx_lm reads, e.g. the quality
bench's converted variants).

The forward pass is layer-major: every token of the batch goes through layer L
before layer L+1 is read. Batched, left-padded prompts with a KV cache;
`hook(path, x)` sees the input of every linear module (path = MLX module path;
the tied head is "<embed>#head"). With streamed weights every forward call reads
the whole model once (generation: once per decode step; the KV cache keeps
decode steps to one token each), and the head is computed in vocabulary blocks
so that a 152k-row head never sits whole in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .npweights import StreamedWeights, Weights, WholeWeights

Hook = Callable[[str, np.ndarray], None]
SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    theta: float
    tied: bool
    qk_norm: bool


def supports(config: dict) -> bool:
    return config.get("model_type") in SUPPORTED and not config.get("rope_scaling")


class NpModel:
    def __init__(self, weights: Weights | dict[str, np.ndarray], config: dict):
        # mlx_lm's default for these families when the config does not say
        tied = config.get("tie_word_embeddings", True)
        self.weights = weights if isinstance(weights, Weights) else WholeWeights(weights, tied)
        heads = config["num_attention_heads"]
        self.shape = Shape(
            layers=config["num_hidden_layers"], heads=heads,
            kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            eps=config.get("rms_norm_eps", 1e-6), theta=config.get("rope_theta", 10000.0),
            tied=tied, qk_norm="model.layers.0.self_attn.q_norm.weight" in self.weights,
        )

    @property
    def overrides(self) -> dict:
        """Weight key -> array or row-wise function applied when it is read (npweights)."""
        return self.weights.overrides

    @classmethod
    def from_mlx(cls, model, config: dict) -> NpModel:
        """Dense float32 copies of an mlx_lm model's weights (dequantized where needed)."""
        import mlx.core as mx
        import mlx.nn as nn

        weights = {}
        for path, module in model.named_modules():
            if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                w = mx.dequantize(module.weight, module.scales, module.get("biases"),
                                  module.group_size, module.bits, mode=module.mode,
                                  dtype=mx.float32)
                weights[f"{path}.weight"] = np.array(w.astype(mx.float32))
            elif isinstance(module, (nn.Linear, nn.Embedding, nn.RMSNorm)):
                weights[f"{path}.weight"] = np.array(module.weight.astype(mx.float32))
            if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and "bias" in module:
                weights[f"{path}.bias"] = np.array(module.bias.astype(mx.float32))
        return cls(weights, config)

    @classmethod
    def load(cls, path: str | Path) -> tuple[NpModel, object]:
        """(model, tokenizer) of an MLX or HF checkpoint folder, through mlx_lm, whole."""
        import json

        from mlx_lm import load

        model, tokenizer = load(str(path))
        config = json.loads((Path(path) / "config.json").read_text())
        return cls.from_mlx(model, config), tokenizer

    @classmethod
    def stream(cls, path: str | Path) -> tuple[NpModel, object]:
        """(model, tokenizer) of a float safetensors checkpoint, its weights read on
        demand (never the whole model in memory; no MLX arrays at all)."""
        from mlx_lm.utils import load_config, load_tokenizer

        from .sources.checkpoint import open_checkpoint

        ckpt = open_checkpoint(path)
        if not supports(ckpt.config):
            raise ValueError(f"the numpy model runs {', '.join(SUPPORTED)} without rope "
                             f"scaling; {path} is {ckpt.config.get('model_type')!r}")
        tied = ckpt.config.get("tie_word_embeddings", True)
        eos = load_config(Path(path)).get("eos_token_id")
        tokenizer = load_tokenizer(Path(path), eos_token_ids=eos)
        return cls(StreamedWeights(ckpt, tied), ckpt.config), tokenizer

    # -- forward ---------------------------------------------------------------

    def head_name(self) -> str:
        """The head's hook path: the tied embedding's is "model.embed_tokens#head"."""
        key = self.weights.head_key()
        return "lm_head" if key == "lm_head.weight" else "model.embed_tokens#head"

    def forward(self, tokens: np.ndarray, cache: list | None = None,
                valid: np.ndarray | None = None, hook: Hook | None = None,
                logits: str = "all") -> np.ndarray | None:
        """Logits [B, T, V] for tokens [B, T] (logits="last": [B, 1, V], only the last
        position's; "none": no head at all, for hooks). `cache` (from new_cache) is
        extended in place; `valid` [B, S_total] marks real (not padding) positions."""
        s = self.shape
        b, t = tokens.shape
        past = cache[0][0].shape[2] if cache and cache[0][0] is not None else 0
        if valid is None:
            valid = np.ones((b, past + t), dtype=bool)
        positions = np.cumsum(valid, axis=1)[:, past:] - 1  # per row, skipping padding
        h = self.weights.embed(tokens)
        cos, sin = _rope(positions, s.head_dim, s.theta)
        mask = _mask(valid, past, t)
        for i in range(s.layers):
            w = self.weights.layer(i)  # read now, dropped when the next layer replaces it
            h = self._layer(i, w, h, cos, sin, mask, cache, hook)
            del w
        x = _rms(h, self.weights.get("model.norm.weight"), s.eps)
        if hook is not None:
            hook(self.head_name(), x)
        if logits == "none":
            return None
        if logits == "last":
            x = x[:, -1:]
        return self._head(x)

    def _layer(self, i: int, w: dict[str, np.ndarray], h: np.ndarray, cos, sin, mask,
               cache: list | None, hook: Hook | None) -> np.ndarray:
        s = self.shape
        b, t, _ = h.shape
        p = f"model.layers.{i}"

        def linear(name: str, x: np.ndarray) -> np.ndarray:
            if hook is not None:
                hook(f"{p}.{name}", x)
            out = x @ w[f"{p}.{name}.weight"].T
            bias = w.get(f"{p}.{name}.bias")
            return out if bias is None else out + bias

        x = _rms(h, w[f"{p}.input_layernorm.weight"], s.eps)
        q = linear("self_attn.q_proj", x)
        k = linear("self_attn.k_proj", x)
        v = linear("self_attn.v_proj", x)
        q = q.reshape(b, t, s.heads, s.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(b, t, s.kv_heads, s.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(b, t, s.kv_heads, s.head_dim).transpose(0, 2, 1, 3)
        if s.qk_norm:
            q = _rms(q, w[f"{p}.self_attn.q_norm.weight"], s.eps)
            k = _rms(k, w[f"{p}.self_attn.k_norm.weight"], s.eps)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is not None:
            if cache[i][0] is not None:
                k = np.concatenate([cache[i][0], k], axis=2)
                v = np.concatenate([cache[i][1], v], axis=2)
            cache[i] = (k, v)
        attn = _attention(q, k, v, mask, s.heads // s.kv_heads)
        attn = attn.transpose(0, 2, 1, 3).reshape(b, t, s.heads * s.head_dim)
        h = h + linear("self_attn.o_proj", attn)
        x = _rms(h, w[f"{p}.post_attention_layernorm.weight"], s.eps)
        gate = linear("mlp.gate_proj", x)
        up = linear("mlp.up_proj", x)
        act = gate / (1.0 + np.exp(-gate)) * up
        return h + linear("mlp.down_proj", act)

    def _head(self, x: np.ndarray) -> np.ndarray:
        """x @ head.T, the head read a row block at a time."""
        key = self.weights.head_key()
        out = np.empty((*x.shape[:-1], self.weights.shape(key)[0]), dtype=np.float32)
        for r0, block in self.weights.row_blocks(key):
            out[..., r0:r0 + block.shape[0]] = x @ block.T
        return out

    def new_cache(self) -> list:
        return [(None, None) for _ in range(self.shape.layers)]

    # -- generation ------------------------------------------------------------

    def generate(self, prompts: list[list[int]], max_new: int, temperature: float, seed: int,
                 stop: set[int]) -> list[list[int]]:
        """Sampled continuations of left-padded prompts, decoded together."""
        rng = np.random.default_rng(seed)
        b, longest = len(prompts), max(len(p) for p in prompts)
        tokens = np.zeros((b, longest), dtype=np.int64)
        valid = np.zeros((b, longest), dtype=bool)
        for i, p in enumerate(prompts):
            tokens[i, longest - len(p):] = p
            valid[i, longest - len(p):] = True
        cache = self.new_cache()
        logits = self.forward(tokens, cache, valid, logits="last")[:, -1]
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(b, dtype=bool)
        for _ in range(max_new):
            nxt = _sample(logits, temperature, rng)
            for i in np.flatnonzero(~done):
                out[i].append(int(nxt[i]))
                done[i] = int(nxt[i]) in stop
            if done.all():
                break
            valid = np.concatenate([valid, np.ones((b, 1), dtype=bool)], axis=1)
            logits = self.forward(nxt[:, None], cache, valid, logits="last")[:, -1]
        return [o[:-1] if o and o[-1] in stop else o for o in out]


def _sample(logits: np.ndarray, temperature: float, rng) -> np.ndarray:
    if temperature <= 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), p.shape[-1] - 1)


def _rms(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _rope(positions: np.ndarray, dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = positions[..., None].astype(np.float64) * inv  # [B, T, dim/2]
    return np.cos(angles).astype(np.float32)[:, None], np.sin(angles).astype(np.float32)[:, None]


def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _mask(valid: np.ndarray, past: int, t: int) -> np.ndarray:
    """Additive [B, 1, T, S] mask: causal, and no attention to padding."""
    s = valid.shape[1]
    causal = np.arange(s)[None, :] <= (past + np.arange(t))[:, None]
    allowed = causal[None] & valid[:, None, :]
    return np.where(allowed, 0.0, -1e9).astype(np.float32)[:, None]


def _attention(q, k, v, mask, repeat: int) -> np.ndarray:
    b, h, t, d = q.shape
    q = q.reshape(b, h // repeat, repeat * t, d) if repeat > 1 else q
    # a float32 factor: a numpy float64 scalar would turn everything after into float64
    scores = q @ k.transpose(0, 1, 3, 2) * np.float32(1.0 / np.sqrt(d))
    if repeat > 1:
        scores = scores.reshape(b, h // repeat, repeat, t, -1) + mask[:, :, None]
    else:
        scores = scores + mask
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    if repeat > 1:
        out = scores.reshape(b, h // repeat, repeat * t, -1) @ v
        return out.reshape(b, h, t, d)
    return scores @ v
