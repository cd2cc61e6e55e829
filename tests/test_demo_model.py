"""The bundled demo model: a real Qwen3 checkpoint that mlx_lm loads and that learned text.

The model is trained by scripts/train_demo_model.py (torch, dev only); the script
itself checks torch-vs-MLX logits. Here, with MLX alone, we check what a user
relies on: the files, the names and shapes quantization needs, that the text it
writes is learned (held-out perplexity far below uniform, real words), and that
it speaks the chat template, reasoning markers and tool calls included.
"""

from __future__ import annotations

import json
import math
import re
import struct
from functools import lru_cache

import pytest

from swan_serve import DEMO_MODEL_DIR
from swan_serve.quant.fixtures import corpus

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
}
LAYER_TENSORS = {
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
}


def safetensors_header() -> dict:
    with open(DEMO_MODEL_DIR / "model.safetensors", "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def config() -> dict:
    return json.loads((DEMO_MODEL_DIR / "config.json").read_text())


@lru_cache(maxsize=1)
def loaded():
    from mlx_lm import load

    return load(str(DEMO_MODEL_DIR))


def greedy(prompt: str, max_tokens: int) -> str:
    from mlx_lm import generate

    model, tokenizer = loaded()
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


def chat_prompt(question: str, tools: list[dict] | None = None) -> str:
    _, tokenizer = loaded()
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )


@lru_cache(maxsize=1)
def training_words() -> frozenset[str]:
    return frozenset(re.findall(r"[A-Za-z]{2,}", corpus.train_text(10**8)))


def real_word_share(text: str, min_words: int = 5) -> float:
    """Share of the text's words (2+ letters) that occur in the training text."""
    words = re.findall(r"[A-Za-z]{2,}", text)
    assert len(words) >= min_words, f"too few words to judge: {text!r}"
    return sum(word in training_words() for word in words) / len(words)


def test_files_and_size() -> None:
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert EXPECTED_FILES <= names
    total = sum((DEMO_MODEL_DIR / name).stat().st_size for name in names)
    assert total <= 10.5e6, f"demo model is {total / 1e6:.1f} MB"


def test_config_is_a_tied_qwen3() -> None:
    c = config()
    assert c["model_type"] == "qwen3" and c["architectures"] == ["Qwen3ForCausalLM"]
    assert c["tie_word_embeddings"] is True
    assert c["num_attention_heads"] % c["num_key_value_heads"] == 0


def test_tensor_names_dtype_and_quantizable_shapes() -> None:
    c = config()
    header = safetensors_header()
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{name}" for i in range(c["num_hidden_layers"]) for name in LAYER_TENSORS
    }
    assert set(header) == expected  # tied: no lm_head.weight
    assert {info["dtype"] for info in header.values()} == {"BF16"}
    shapes = {name: info["shape"] for name, info in header.items()}
    assert shapes["model.embed_tokens.weight"] == [c["vocab_size"], c["hidden_size"]]
    for name, shape in shapes.items():
        if len(shape) == 2:
            # Every matrix's input dimension splits into groups of 32, 64 and 128.
            assert shape[1] % 128 == 0, (name, shape)


def test_tokenizer_matches_the_embedding_and_has_chat_tokens() -> None:
    _, tokenizer = loaded()
    assert len(tokenizer.get_vocab()) == config()["vocab_size"]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.has_thinking and tokenizer.has_tool_calling


def test_heldout_perplexity_is_far_below_uniform() -> None:
    import mlx.core as mx

    model, tokenizer = loaded()
    ids = tokenizer.encode(corpus.heldout_text(20_000))
    losses = []
    for start in (0, 2000):  # two 512-token windows of code the model never saw
        window = ids[start : start + 513]
        logits = model(mx.array([window[:-1]])).astype(mx.float32)[0]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.array(window[1:])
        losses.append(-mx.take_along_axis(logprobs, targets[:, None], axis=-1).mean().item())
    perplexity = math.exp(sum(losses) / len(losses))
    vocab = config()["vocab_size"]
    assert perplexity < vocab / 10, f"held-out perplexity {perplexity:.1f} (vocab {vocab})"


@pytest.mark.parametrize("prompt", ["def read_config(path):\n    ", "import os\n\n\nclass "])
def test_greedy_code_is_made_of_learned_words(prompt: str) -> None:
    text = greedy(prompt, max_tokens=48)
    assert real_word_share(text) >= 0.9, text


def greedy_reply(prompt: str, max_tokens: int) -> tuple[str, str | None]:
    """The reply text and why generation ended ("stop" at <|im_end|>, "length")."""
    from mlx_lm import stream_generate

    model, tokenizer = loaded()
    text, reason = "", None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        text += response.text
        reason = response.finish_reason
    return text, reason


def parsed_tool_calls(text: str) -> list[dict]:
    return [json.loads(c) for c in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.S)]


@pytest.mark.parametrize(
    "question", ["What does `json.dumps` do?", "What is the signature of `os.path.join`?"]
)
def test_chat_reply_thinks_then_answers_then_stops(question: str) -> None:
    text, reason = greedy_reply(chat_prompt(question), max_tokens=100)
    assert reason == "stop", f"no <|im_end|> within 100 tokens: {text!r}"
    assert text.startswith("<think>\n") and "</think>\n\n" in text, text
    answer = text.split("</think>")[-1].strip()
    # The model card's claim: an answer in words, or a well-formed JSON tool call.
    if answer.startswith("<tool_call>"):
        assert parsed_tool_calls(answer), answer
    else:
        assert real_word_share(answer, min_words=3) >= 0.8, answer


def test_chat_with_tools_calls_the_tool() -> None:
    question = "Look up `shutil.copyfile` in the documentation."
    text, reason = greedy_reply(chat_prompt(question, corpus.DOC_TOOLS), max_tokens=100)
    assert reason == "stop", text
    calls = parsed_tool_calls(text)
    assert len(calls) == 1, text
    call = calls[0]
    assert call["name"] in {"lookup_docs", "get_signature"}
    assert isinstance(call["arguments"], dict) and call["arguments"], call


def test_model_card_says_how_to_reproduce() -> None:
    card = (DEMO_MODEL_DIR / "README.md").read_text()
    assert "scripts/train_demo_model.py" in card and "held-out" in card
