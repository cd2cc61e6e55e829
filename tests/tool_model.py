"""Tiny tool-calling models for end-to-end tests, trained (overfit) in seconds with MLX.

A tiny random Qwen3 from the fixture factory (small tokenizer, float32) learns two turns
through its real chat template: the user's question -> a reasoning block and one exact
tool call; the question, that call and the tool's result -> a fixed answer. Two styles:
"hermes" (the factory's Qwen3-style template, JSON calls) and "xml" (the real Qwen3.5
template from ../shared when present, else a bundled template in the same style; it opens
the reasoning block in the prompt and writes XML calls). Training stops as soon as greedy
decoding reproduces both targets exactly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model, load_tokenizer

from swan_serve.quant.fixtures import write_checkpoint
from swan_serve.quant.fixtures.tokenizer import fixture_cache_dir, shared_dir
from swan_serve.server.chat.tool_messages import template_messages

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,  # the openai SDK's stream helper only takes strict tools
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
QUESTION = "What is the weather in Zürich in 3 days?"
CALL_ARGUMENTS = {"city": "Zürich", "days": 3}
REASONING = "The user wants a forecast."
TOOL_RESULT = '{"temperature": 21, "sky": "sunny"}'
ANSWER = "It will be sunny and 21 degrees in Zürich."
# The XML template opens a reasoning block on every turn, so that model closes it first.
FOLLOW_UP_REASONING = "The tool answered."

# A Qwen3.5-style template (tools in the system turn, XML calls, reasoning opened in the
# prompt), used when ../shared does not have the real one.
XML_TEMPLATE = r"""{%- if tools %}
{{- '<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools>\n\nTo call a function reply with:\n<tool_call>\n<function=NAME>\n'
    '<parameter=ARG>\nvalue\n</parameter>\n</function>\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or message.role == 'system' %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\n' + (message.content or '') }}
{%- for call in message.tool_calls or [] %}
{%- set call = call.function %}
{{- '<tool_call>\n<function=' + call.name + '>\n' }}
{%- for key, value in call.arguments | items %}
{{- '<parameter=' + key + '>\n' + (value | string) + '\n</parameter>\n' }}
{%- endfor %}
{{- '</function>\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}
{%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}"""

_DONE = "trained.json"
_MAX_STEPS = 400
_CHECK_EVERY = 10
# Smaller than the factory's tiny default: training cost is what matters here.
_MODEL = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
          "head_dim": 32, "intermediate_size": 128, "num_hidden_layers": 1}


@dataclass(frozen=True)
class ToolModel:
    path: Path
    style: str  # "hermes" or "xml"
    first_target: str  # what the model writes after the question (end token excluded)
    answer: str  # what it writes after the tool's result
    train_seconds: float
    steps: int


def real_qwen35_template() -> str | None:
    path = shared_dir() / "models" / "Qwen3.5-397B-A17B" / "chat_template.jinja"
    return path.read_text() if path.is_file() else None


def first_turn() -> list[dict[str, Any]]:
    return [{"role": "user", "content": QUESTION}]


def follow_up(call_id: str = "call_0") -> list[dict[str, Any]]:
    """The second turn as an OpenAI client sends it: arguments as a JSON string."""
    call = {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(CALL_ARGUMENTS)}}
    return [*first_turn(),
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT}]


def call_text(style: str) -> str:
    if style == "hermes":
        body = json.dumps({"name": "get_weather", "arguments": CALL_ARGUMENTS},
                          ensure_ascii=False)
        return f"<tool_call>\n{body}\n</tool_call>"
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in CALL_ARGUMENTS.items())
    return f"<tool_call>\n<function=get_weather>\n{params}</function>\n</tool_call>"


def cached_tool_model(style: str, chat_template: str | None = None) -> ToolModel:
    """The trained model, from the fixture cache when this exact one was trained before.

    The key covers the untrained checkpoint's files, this module's source, the template and
    the MLX build, so any change retrains. Training happens in a staging folder that is
    renamed into place, so an interrupted run never leaves a half-trained entry.
    """
    cache = fixture_cache_dir() / "tool-models"
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{style}-", dir=cache))
    try:
        path = _untrained(staging / "model", chat_template)
        target = cache / f"{style}-{_cache_key(path, style)}"
        if not (target / _DONE).is_file():
            model = _train_model(path, style)
            (path / _DONE).write_text(json.dumps({"seconds": model.train_seconds,
                                                  "steps": model.steps}))
            try:
                path.rename(target)
            except OSError:
                if not (target / _DONE).is_file():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    done = json.loads((target / _DONE).read_text())
    return ToolModel(target, style, _targets(style)[0], ANSWER, done["seconds"], done["steps"])


def build_tool_model(out_dir: Path, style: str, chat_template: str | None = None) -> ToolModel:
    """Writes a fixture checkpoint into out_dir and trains it until it says its lines."""
    return _train_model(_untrained(out_dir, chat_template), style)


def _cache_key(path: Path, style: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"{style}|{mx.__version__}|{mx.default_device()}|".encode())
    digest.update(Path(__file__).read_bytes())
    for name in sorted(p.name for p in path.iterdir()):
        digest.update(name.encode() + (path / name).read_bytes())
    return digest.hexdigest()[:16]


def _targets(style: str) -> tuple[str, str]:
    # Hermes: the model opens its reasoning block; XML: the template already did, on
    # every turn, so the follow-up closes one too.
    opening = "<think>\n" if style == "hermes" else ""
    first = f"{opening}{REASONING}\n</think>\n\n{call_text(style)}"
    second = ANSWER if style == "hermes" else f"{FOLLOW_UP_REASONING}\n</think>\n\n{ANSWER}"
    return first, second


def _untrained(out_dir: Path, chat_template: str | None) -> Path:
    path = write_checkpoint(out_dir, "qwen3", tokenizer="small", dtype="float32",
                            overrides=_MODEL)
    if chat_template is not None:
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = chat_template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return path


def _train_model(path: Path, style: str) -> ToolModel:
    model, _ = load_model(path)
    tokenizer = load_tokenizer(path)
    first, second = _targets(style)
    examples = [(first_turn(), first), (follow_up(), second)]
    pairs = [(_prompt(tokenizer, m), _encode(tokenizer, t) + [tokenizer.eos_token_id])
             for m, t in examples]
    start = time.perf_counter()
    steps = _train(model, pairs)
    seconds = time.perf_counter() - start
    (path / "model.safetensors").unlink()
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    return ToolModel(path, style, first, ANSWER, seconds, steps)


def _prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    # The same rendering the server does: template-ready messages, the request's tools.
    return list(tokenizer.apply_chat_template(template_messages(messages), tools=[WEATHER_TOOL],
                                              add_generation_prompt=True))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _train(model: nn.Module, pairs: list[tuple[list[int], list[int]]]) -> int:
    mx.random.seed(0)
    width = max(len(p) + len(t) for p, t in pairs)
    inputs, targets, weights = [], [], []
    for prompt, target in pairs:
        ids = prompt + target
        pad = width - len(ids)
        inputs.append(ids[:-1] + [0] * pad)
        targets.append(ids[1:] + [0] * pad)
        # Learn only the answer tokens.
        weights.append([0.0] * (len(prompt) - 1) + [1.0] * len(target) + [0.0] * pad)
    x, y, w = mx.array(inputs), mx.array(targets), mx.array(weights)

    def loss_fn(m: nn.Module) -> mx.array:
        losses = nn.losses.cross_entropy(m(x), y, reduction="none")
        return (losses * w).sum() / w.sum()

    optimizer = optim.Adam(learning_rate=1e-2)
    step = mx.compile(_train_step(loss_fn, optimizer, model), inputs=[model.state,
                      optimizer.state], outputs=[model.state, optimizer.state])
    for n in range(1, _MAX_STEPS + 1):
        loss = step()
        mx.eval(loss, model.state, optimizer.state)
        if n % _CHECK_EVERY == 0 and loss.item() < 0.05 and _says_its_lines(model, pairs):
            return n
    raise RuntimeError(f"the tool model did not learn its lines in {_MAX_STEPS} steps")


def _train_step(loss_fn: Any, optimizer: optim.Optimizer, model: nn.Module) -> Any:
    grad = nn.value_and_grad(model, loss_fn)

    def step() -> mx.array:
        loss, grads = grad(model)
        optimizer.update(model, grads)
        return loss

    return step


def _says_its_lines(model: nn.Module, pairs: list[tuple[list[int], list[int]]]) -> bool:
    """Greedy decoding reproduces every target exactly (checked teacher-forced, in one
    forward pass: if every next-token argmax matches, greedy takes exactly this path)."""
    for prompt, target in pairs:
        logits = model(mx.array([prompt + target[:-1]]))[0, len(prompt) - 1:]
        if mx.argmax(logits, axis=-1).tolist() != target:
            return False
    return True
