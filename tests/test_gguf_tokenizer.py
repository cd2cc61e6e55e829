"""The tokenizer rebuilt from tokenizer.ggml.* encodes like the original it was written from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from swan_serve.quant.fixtures.gguf_writer import add_tokenizer  # noqa: E402
from swan_serve.quant.sources.gguf_file import open_gguf  # noqa: E402
from swan_serve.quant.sources.gguf_tokenizer import (  # noqa: E402
    TokenizerRebuildError,
    build_tokenizer_files,
    write_tokenizer_files,
)

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog 1234567.",
    "Grüße aus München: Äpfel, Öl und Übermut — naïve café.",
    "Привет, как дела? Всё хорошо, спасибо!",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "こんにちは、元気ですか？カタカナとひらがな。",
    "안녕하세요, 반갑습니다.",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया",
    "emoji 😀🎉👍🏽 and symbols ∑∫√ ≠ ≤ ≥",
    "def f(x):\n\treturn x**2  # tabs\n\n\n   spaces   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nok\n</think>\n\n<tool_call>{}</tool_call><|endoftext|>",
    "  leading and trailing  \r\n windows newlines\r\n",
]


def _write_vocab_gguf(tokenizer_dir: Path, path: Path, pre: str = "qwen2") -> Path:
    writer = gguf.GGUFWriter(path, "qwen3")
    add_tokenizer(writer, tokenizer_dir, pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_rebuilt_qwen3_tokenizer_encodes_like_the_real_one(shared_models_dir, tmp_path):
    from transformers import AutoTokenizer

    original = shared_models_dir / "Qwen3-8B"
    model = open_gguf(_write_vocab_gguf(original, tmp_path / "vocab.gguf"))
    out = tmp_path / "rebuilt"
    out.mkdir()
    write_tokenizer_files(model, out)
    ref = AutoTokenizer.from_pretrained(original)
    ours = AutoTokenizer.from_pretrained(out)
    for text in CORPUS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ref.encode(text)) == ref.decode(ref.encode(text))
    assert ours.eos_token == ref.eos_token
    assert ours.chat_template == ref.chat_template
    assert len(ours) == len(ref)


def test_unknown_pre_tokenizer_asks_for_tokenizer(shared_models_dir, tmp_path):
    original = shared_models_dir / "Qwen3-8B"
    model = open_gguf(_write_vocab_gguf(original, tmp_path / "v.gguf", pre="deepseek-v3"))
    with pytest.raises(TokenizerRebuildError, match="--tokenizer"):
        build_tokenizer_files(model)


def _write_sentencepiece_gguf(tokenizer_dir: Path, path: Path) -> Path:
    """tokenizer.ggml.* as llama.cpp writes a SentencePiece BPE vocabulary: pieces by id,
    scores (a BPE model's score is minus the piece's merge rank) and token types."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    types = [gguf.TokenType.UNKNOWN if tok == "<unk>" else gguf.TokenType.CONTROL
             if tok in special else gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", tok)
             else gguf.TokenType.NORMAL for tok in tokens]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_unk_token_id(vocab["<unk>"])
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_rebuilt_sentencepiece_tokenizer_encodes_like_the_original(shared_models_dir, tmp_path):
    from transformers import AutoTokenizer

    original = shared_models_dir / "stories260K"
    model = open_gguf(_write_sentencepiece_gguf(original, tmp_path / "sp.gguf"))
    out = tmp_path / "rebuilt"
    out.mkdir()
    write_tokenizer_files(model, out)
    ref, ours = AutoTokenizer.from_pretrained(original), AutoTokenizer.from_pretrained(out)
    for text in [*CORPUS, "Once upon a time, there was a little girl named Lily.",
                 "She liked to play outside.  Two  spaces, trailing space "]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ref.encode(text)) == ref.decode(ref.encode(text))
