"""Write the trained model as a Hugging Face Qwen3 checkpoint (bf16) and check it in MLX."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from swan_serve.quant.fixtures.tokenizer import EOS_TOKEN, PAD_TOKEN, save_tokenizer

from .model import Qwen3ForCausalLM


def export_weights(model: Qwen3ForCausalLM) -> dict[str, torch.Tensor]:
    """HF names, bf16; the tied LM head is not stored (as in Qwen3-0.6B)."""
    return {
        name: tensor.detach().to(torch.bfloat16).contiguous()
        for name, tensor in sorted(model.state_dict().items())
    }


def write_checkpoint(
    model: Qwen3ForCausalLM, tokenizer: Tokenizer, out_dir: Path, model_card: str
) -> None:
    """Write every file into a staging dir, then swap it in (never half-written)."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    pad = tokenizer.token_to_id(PAD_TOKEN)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_file(export_weights(model), str(staging / "model.safetensors"), {"format": "pt"})
        config = model.shape.hf_config(eos_token_id=eos, pad_token_id=pad)
        config["eos_token_id"] = [eos, pad]  # stop after a chat turn or a raw document
        _write_json(staging / "config.json", config)
        generation = {
            "bos_token_id": pad,
            "eos_token_id": [eos, pad],
            "pad_token_id": pad,
            "do_sample": True,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.95,
        }
        _write_json(staging / "generation_config.json", generation)
        save_tokenizer(tokenizer, staging, model_max_length=model.shape.max_position_embeddings)
        (staging / "README.md").write_text(model_card, encoding="utf-8")
        _make_readable(staging)
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    # mkdtemp creates 0700; the model ships inside the package, so use normal modes.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _swap_in(staging: Path, out_dir: Path) -> None:
    old = out_dir.with_name(f".{out_dir.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def directory_megabytes(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6


def compare_with_mlx(model: Qwen3ForCausalLM, model_dir: Path, ids: list[int]) -> dict[str, float]:
    """Max |logit difference| between this torch model and mlx_lm's load of model_dir.

    The torch side uses the exported bf16 weights computed in float32; the MLX side
    is compared once in float32 (faithfulness of the export: should be ~1e-4) and
    once as loaded, in bf16 (what serving computes).
    """
    import mlx.core as mx
    from mlx_lm import load

    reference = Qwen3ForCausalLM(model.shape)
    reference.load_state_dict({k: v.float() for k, v in export_weights(model).items()})
    reference.eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).numpy()[0]

    mlx_model, _ = load(str(model_dir))
    bf16 = np.array(mlx_model(mx.array([ids])).astype(mx.float32))[0]
    mlx_model.set_dtype(mx.float32)
    fp32 = np.array(mlx_model(mx.array([ids])))[0]
    return {
        "max_abs_diff_fp32": float(np.abs(fp32 - expected).max()),
        "max_abs_diff_bf16": float(np.abs(bf16 - expected).max()),
        "logit_scale": float(np.abs(expected).max()),
        "top1_agreement_bf16": float((bf16.argmax(-1) == expected.argmax(-1)).mean()),
    }
