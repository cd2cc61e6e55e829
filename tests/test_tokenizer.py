"""The small trained tokenizers, their chat template, and the corpus they train on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from swan_serve.quant.fixtures import corpus
from swan_serve.quant.fixtures.tokenizer import (
    CONTROL_TOKENS,
    MARKER_TOKENS,
    SPECIAL_TOKENS,
    copy_qwen3_tokenizer,
    qwen3_tokenizer_dir,
    train_tokenizer,
    write_small_tokenizer,
)

SAMPLES = [
    "def add(a, b):\n    return a + b\n",
    "Return the sum of *a* and *b*.  Tabs\tand  double  spaces.",
    "Unicode: naïve café, 日本語, emoji 🐍, zero-width\u200bjoin.",
    "",
    "\n\n\n    trailing   ",
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixture-cache")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("tok")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SWAN_SERVE_FIXTURE_CACHE", str(cache_dir))
        write_small_tokenizer(out, vocab_size=512)
    return out


@pytest.fixture(scope="module")
def small(small_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(small_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tokenizer(small_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_dir)


def test_written_files_and_config(small_dir: Path, small: Tokenizer) -> None:
    names = {p.name for p in small_dir.iterdir()}
    assert names == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((small_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<tool_call>" in config["chat_template"]
    assert small.get_vocab_size() == 512


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(small: Tokenizer, text: str) -> None:
    ids = small.encode(text).ids
    assert small.decode(ids, skip_special_tokens=False) == text


def test_merges_compress_code(small: Tokenizer) -> None:
    # A trained BPE must beat one token per byte on the text it was trained for.
    text = corpus.heldout_text(5000)
    assert len(small.encode(text).ids) < 0.6 * len(text.encode())


def test_special_tokens_are_single_ids(small: Tokenizer) -> None:
    ids = [small.token_to_id(token) for token in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(SPECIAL_TOKENS)
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert small.encode(token).ids == [token_id]
        # Also inside running text, with no space around it.
        encoded = small.encode(f"x{token}y").ids
        assert token_id in encoded and len(encoded) == 3


def test_markers_survive_skip_special_tokens(small: Tokenizer) -> None:
    text = "<|im_start|>assistant\n<think>why</think><tool_call>{}</tool_call><|im_end|>"
    decoded = small.decode(small.encode(text).ids, skip_special_tokens=True)
    for marker in MARKER_TOKENS[:4]:
        assert marker in decoded
    for control in CONTROL_TOKENS:
        assert control not in decoded


def test_chat_template_renders_tools_calls_results_and_thinking(hf_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should call the tool.",
            "tool_calls": [
                {
                    "type": "function",
                    "id": "call_1",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "<think>Tool said 21.</think>It is 21 °C."},
    ]
    text = hf_tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) + "\n</tools>" in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert call in text
    assert "<think>\nI should call the tool.\n</think>\n\n" + call in text
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<think>\nTool said 21.\n</think>\n\nIt is 21 °C.<|im_end|>\n")


def test_chat_template_drops_old_reasoning_and_string_arguments(hf_tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>old</think>Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}],
        },
    ]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    assert "old" not in text and "<|im_start|>assistant\nHello!<|im_end|>" in text
    assert "<|im_start|>user\nWeather?<|im_end|>" in text
    assert 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text


def test_generation_prompt_and_enable_thinking(hf_tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    thinking = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert thinking == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    plain = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert plain == thinking + "<think>\n\n</think>\n\n"


def test_mlx_lm_infers_thinking_and_json_tool_calls(small_dir: Path) -> None:
    from mlx_lm.tokenizer_utils import load

    wrapper = load(small_dir)
    assert wrapper.has_thinking and wrapper.think_start == "<think>"
    assert wrapper.has_tool_calling and wrapper.tool_call_start == "<tool_call>"
    assert wrapper.eos_token_ids == {wrapper.convert_tokens_to_ids("<|im_end|>")}


def test_training_is_deterministic_across_processes() -> None:
    texts = [corpus.train_text(20_000)]
    here = train_tokenizer(texts, 400).to_str()
    assert train_tokenizer(texts, 400).to_str() == here
    script = (
        "import sys; from swan_serve.quant.fixtures import corpus, tokenizer as t; "
        "sys.stdout.write(t.train_tokenizer([corpus.train_text(20_000)], 400).to_str())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert other.stdout == here


def test_too_small_vocab_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        train_tokenizer(["abc"], 100)


def test_cache_makes_repeat_calls_fast_and_identical(
    small_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWAN_SERVE_FIXTURE_CACHE", str(cache_dir))
    entries = sorted(p.name for p in cache_dir.iterdir())
    assert len(entries) == 1 and not entries[0].startswith(".")
    start = time.perf_counter()
    write_small_tokenizer(tmp_path, vocab_size=512)
    assert time.perf_counter() - start < 1.0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (small_dir / name).read_bytes()
    assert sorted(p.name for p in cache_dir.iterdir()) == entries  # no temp dirs left


def test_copy_qwen3_tokenizer_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAN_SHARED_DIR", str(tmp_path / "nowhere"))
    assert copy_qwen3_tokenizer(tmp_path / "out") is False
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    not (qwen3_tokenizer_dir() / "tokenizer.json").exists(),
    reason="the real Qwen3 tokenizer (../shared/models/Qwen3-8B) is not on this machine",
)
def test_copy_qwen3_tokenizer_present(tmp_path: Path) -> None:
    assert copy_qwen3_tokenizer(tmp_path) is True
    qwen = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert qwen.get_vocab_size() > 150_000
    assert qwen.encode("<tool_call>").ids == [qwen.token_to_id("<tool_call>")]


# --- the corpus ---------------------------------------------------------------


def test_split_is_by_top_level_package_and_disjoint() -> None:
    train = {m.name for m in corpus.modules_in("train")}
    heldout = {m.name for m in corpus.modules_in("heldout")}
    assert train and heldout and not train & heldout
    assert {name.split(".")[0] for name in train}.isdisjoint(n.split(".")[0] for n in heldout)
    # Held out is a minority but large enough to measure on.
    assert 0.03 < len(heldout) / (len(train) + len(heldout)) < 0.3


def test_heldout_text_is_fixed_and_not_training_text() -> None:
    held = corpus.heldout_text(50_000)
    assert len(held) == 50_000 and held == corpus.heldout_text(50_000)
    assert held[:2000] not in corpus.train_text(10**8)


def test_chat_examples_answer_with_docstring_sentences() -> None:
    examples = corpus.chat_examples("heldout")
    assert len(examples) > 100
    kinds = {"tool": 0, "think": 0, "plain": 0}
    for example in examples:
        final = example.messages[-1]
        assert final["role"] == "assistant"
        if final.get("tool_calls"):
            kinds["tool"] += 1
        elif final["reasoning_content"]:
            kinds["think"] += 1
        else:
            kinds["plain"] += 1
    assert all(count > 10 for count in kinds.values()), kinds
    entry = corpus.doc_entries("heldout")[0]
    assert corpus.chat_example(entry) == corpus.chat_example(entry)
