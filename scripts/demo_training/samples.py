"""Greedy and sampled text from the exported model, through mlx_lm as a user runs it."""

from __future__ import annotations

from pathlib import Path

from swan_serve.quant.fixtures.corpus import DOC_TOOLS

TEXT_PROMPTS = ['def read_config(path):\n    """', "import os\nimport sys\n\n\nclass ", "    if "]
CHAT_PROMPTS = [
    ("What does `json.dumps` do?", None),  # json is in the training split
    ("What does `logging.getLogger` do?", None),  # logging is held out
    ("What is the signature of `os.path.join`?", None),
    ("Look up `shutil.copyfile` in the documentation.", DOC_TOOLS),
]


def generate_samples(model_dir: Path, max_tokens: int = 60) -> list[dict]:
    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(model_dir))
    samples = []
    for prompt in TEXT_PROMPTS:
        for temp in (0.0, 0.8):
            mx.random.seed(0)
            text = generate(
                model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp)
            )
            samples.append({"kind": "text", "temp": temp, "prompt": prompt, "output": text})
    for question, tools in CHAT_PROMPTS:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
        text = generate(model, tokenizer, prompt, max_tokens=max_tokens + 20)
        samples.append({"kind": "chat", "temp": 0.0, "prompt": question, "output": text})
    return samples


def format_samples(samples: list[dict]) -> str:
    blocks = []
    for sample in samples:
        header = f"{sample['kind']}, temperature {sample['temp']}: {sample['prompt']!r}"
        body = sample["prompt"] + sample["output"] if sample["kind"] == "text" else sample["output"]
        blocks.append(f"{header}\n\n```\n{body}\n```")
    return "\n\n".join(blocks)
