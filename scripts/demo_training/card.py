"""The demo model's README.md: what it is, how it was trained, how to reproduce it."""

from __future__ import annotations


def model_card(figures: dict, samples_markdown: str) -> str:
    f = figures
    shape = f["shape"]
    heads = f"{shape['num_attention_heads']} / {shape['num_key_value_heads']} / {shape['head_dim']}"
    context = (
        f"{f['seq_len']} tokens (config allows {shape['max_position_embeddings']}; "
        "quality drops past the trained length)"
    )
    source = f"{f['heldout_source_loss']:.3f} / {f['heldout_source_ppl']:.1f}"
    chat = f"{f['heldout_chat_loss']:.3f} / {f['heldout_chat_ppl']:.1f}"
    return f"""# swan-serve demo model

A {f["parameters_m"]:.2f}M-parameter Qwen3-architecture language model (`model_type: qwen3`,
bf16, tied embeddings) that swan-serve trains itself and serves when no model is named.
It writes Python-like code and docstring-like English, and it has learned the form of
a Qwen3-style chat: a `<think>` block, then an answer or a JSON `<tool_call>`, then
`<|im_end|>`. It is a demo and a test subject for quantization, not an assistant:
it knows nothing beyond the standard library's source, and at this size and training
budget its chat replies are mostly a `lookup_docs` tool call (even when no tools are
offered) or a generic docstring sentence, not the right answer.

## Shape

| field | value |
|---|---|
| vocab (byte-level BPE, trained here) | {shape["vocab_size"]} |
| hidden / layers | {shape["hidden_size"]} / {shape["num_hidden_layers"]} |
| heads / KV heads / head_dim | {heads} |
| MLP intermediate | {shape["intermediate_size"]} |
| RoPE theta | {shape["rope_theta"]:g} |
| trained context | {context} |
| files | {f["size_mb"]:.2f} MB |

## Data

The source of CPython {f["python_version"]}'s standard library (tests, codec tables and the
pydoc topic dump left out), read from the machine that trained it, plus one chat per
documented public function, class or method: the user asks what it does (or for its
signature, or to look it up with a `lookup_docs` tool) and the assistant answers with
the first sentence of its docstring. Modules whose top-level package hashes into the
held-out split (`swan_serve.quant.fixtures.corpus.split_of`, about 10%: e.g. `email`,
`logging`, `inspect`) were never trained on; held-out loss is measured on them.

Training tokens available: {f["train_source_tokens"]:,} source + {f["train_chat_tokens"]:,} chat.

## Training

Torch on {f["threads"]} CPU threads, bf16 autocast, AdamW (betas 0.9/0.95, weight
decay {f["weight_decay"]}), peak learning rate {f["lr"]:g} with {f["warmup"]} warm-up steps
and cosine decay to 10%, batch {f["batch"]} x {f["seq_len"]} tokens
({f["chat_share"]:.0%} of rows from chats), seed {f["seed"]}.

| figure | value |
|---|---|
| steps | {f["steps_done"]} of {f["steps"]} planned |
| tokens seen | {f["tokens_seen"]:,} |
| wall time | {f["minutes"]:.1f} min |
| final train loss (last 50 steps) | {f["train_loss"]:.3f} |
| held-out source loss / perplexity | {source} |
| held-out chat loss / perplexity | {chat} |
| uniform-guess loss (ln vocab) | {f["uniform_loss"]:.3f} |

The export is checked against mlx_lm: max |logit difference| between the torch model
and `mlx_lm.load` of these files is {f["mlx"]["max_abs_diff_fp32"]:.2e} in float32 and
{f["mlx"]["max_abs_diff_bf16"]:.2e} in bf16 (logits up to {f["mlx"]["logit_scale"]:.1f}).

{_resumes(f.get("resumed_at", []))}Reproduce (needs torch, `pip install -e .[train]`):

```
{f["command"]}
```

## Samples (mlx_lm.generate; chats with the chat template, greedy)

{samples_markdown}
"""


def _resumes(steps: list[int]) -> str:
    if not steps:
        return ""
    at = ", ".join(str(step) for step in steps)
    return (
        f"The run was interrupted by its time budget and continued with `--resume` at step "
        f"{at}; a resumed run draws the same batches with the same schedule as one "
        "uninterrupted run.\n\n"
    )
