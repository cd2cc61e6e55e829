"""A numpy forward pass of dense Llama-family models (Llama, Qwen2/3, Mistral).

MLX's CPU build multiplies matrices ~30x slower than numpy's BLAS, so the work
that runs the model during quantization (self-generated text, input moments,
class calibration) and the quality bench's evaluation run here when the device
is a CPU. Weights come from mlx_lm's own loaded model (quantized modules are
dequantized), so any checkpoint mlx_lm reads, float or quantized, is covered.

Batched, left-padded prompts with a KV cache; `hook(path, x)` sees the input of
every linear module (path = MLX module path; the tied head is "<embed>#head").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    def __init__(self, weights: dict[str, np.ndarray], config: dict):
        self.w = weights
        heads = config["num_attention_heads"]
        self.shape = Shape(
            layers=config["num_hidden_layers"], heads=heads,
            kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            eps=config.get("rms_norm_eps", 1e-6), theta=config.get("rope_theta", 10000.0),
            tied=config.get("tie_word_embeddings", False),
            qk_norm="model.layers.0.self_attn.q_norm.weight" in weights,
        )

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
        return cls(weights, config)

    @classmethod
    def load(cls, path: str | Path) -> tuple[NpModel, object]:
        """(model, tokenizer) of an MLX or HF checkpoint folder, through mlx_lm."""
        import json

        from mlx_lm import load

        model, tokenizer = load(str(path))
        config = json.loads((Path(path) / "config.json").read_text())
        return cls.from_mlx(model, config), tokenizer

    # -- forward ---------------------------------------------------------------

    def head_weight(self) -> tuple[str, np.ndarray]:
        if self.shape.tied or "lm_head.weight" not in self.w:
            return "model.embed_tokens#head", self.w["model.embed_tokens.weight"]
        return "lm_head", self.w["lm_head.weight"]

    def forward(self, tokens: np.ndarray, cache: list | None = None,
                valid: np.ndarray | None = None, hook: Hook | None = None) -> np.ndarray:
        """Logits [B, T, V] for tokens [B, T]. `cache` (from new_cache) is extended in
        place; `valid` [B, S_total] marks real (not padding) positions so far."""
        s = self.shape
        b, t = tokens.shape
        past = cache[0][0].shape[2] if cache and cache[0][0] is not None else 0
        if valid is None:
            valid = np.ones((b, past + t), dtype=bool)
        positions = np.cumsum(valid, axis=1)[:, past:] - 1  # per row, skipping padding
        h = self.w["model.embed_tokens.weight"][tokens]
        cos, sin = _rope(positions, s.head_dim, s.theta)
        mask = _mask(valid, past, t)
        for i in range(s.layers):
            p = f"model.layers.{i}"
            x = _rms(h, self.w[f"{p}.input_layernorm.weight"], s.eps)
            q = self._linear(f"{p}.self_attn.q_proj", x, hook)
            k = self._linear(f"{p}.self_attn.k_proj", x, hook)
            v = self._linear(f"{p}.self_attn.v_proj", x, hook)
            q = q.reshape(b, t, s.heads, s.head_dim).transpose(0, 2, 1, 3)
            k = k.reshape(b, t, s.kv_heads, s.head_dim).transpose(0, 2, 1, 3)
            v = v.reshape(b, t, s.kv_heads, s.head_dim).transpose(0, 2, 1, 3)
            if s.qk_norm:
                q = _rms(q, self.w[f"{p}.self_attn.q_norm.weight"], s.eps)
                k = _rms(k, self.w[f"{p}.self_attn.k_norm.weight"], s.eps)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            if cache is not None:
                if cache[i][0] is not None:
                    k = np.concatenate([cache[i][0], k], axis=2)
                    v = np.concatenate([cache[i][1], v], axis=2)
                cache[i] = (k, v)
            attn = _attention(q, k, v, mask, s.heads // s.kv_heads)
            attn = attn.transpose(0, 2, 1, 3).reshape(b, t, s.heads * s.head_dim)
            h = h + self._linear(f"{p}.self_attn.o_proj", attn, hook)
            x = _rms(h, self.w[f"{p}.post_attention_layernorm.weight"], s.eps)
            gate = self._linear(f"{p}.mlp.gate_proj", x, hook)
            up = self._linear(f"{p}.mlp.up_proj", x, hook)
            act = gate / (1.0 + np.exp(-gate)) * up
            h = h + self._linear(f"{p}.mlp.down_proj", act, hook)
        x = _rms(h, self.w["model.norm.weight"], s.eps)
        name, head = self.head_weight()
        if hook is not None:
            hook(name, x)
        return x @ head.T

    def new_cache(self) -> list:
        return [(None, None) for _ in range(self.shape.layers)]

    def _linear(self, path: str, x: np.ndarray, hook: Hook | None) -> np.ndarray:
        if hook is not None:
            hook(path, x)
        return x @ self.w[f"{path}.weight"].T

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
        logits = self.forward(tokens, cache, valid)[:, -1]
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
            logits = self.forward(nxt[:, None], cache, valid)[:, -1]
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
