"""Token streams for the demo model: standard-library source and docstring chats.

Both come from swan_serve.quant.fixtures.corpus, so held-out text (the split the
quality benchmark measures on) never reaches training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from swan_serve.quant.fixtures import corpus
from swan_serve.quant.fixtures.tokenizer import CHAT_TEMPLATE, PAD_TOKEN, train_tokenizer


def render_chat(example: corpus.ChatExample) -> str:
    """The conversation as the chat template renders it (what the server will send)."""
    rendered, _ = render_jinja_template(
        [example.messages], tools=example.tools, chat_template=CHAT_TEMPLATE
    )
    return rendered[0]


@dataclass
class Documents:
    source: list[str]
    chat: list[str]

    @classmethod
    def of(cls, split: corpus.Split) -> Documents:
        chats = [render_chat(example) for example in corpus.chat_examples(split)]
        return cls(source=list(corpus.source_texts(split)), chat=chats)


def build_tokenizer(train: Documents, vocab_size: int) -> Tokenizer:
    return train_tokenizer(train.source + train.chat, vocab_size)


def token_stream(tokenizer: Tokenizer, documents: list[str], seed: int | None) -> np.ndarray:
    """All documents, each followed by <|endoftext|>, shuffled when a seed is given."""
    order = list(documents)
    if seed is not None:
        random.Random(seed).shuffle(order)
    separator = tokenizer.token_to_id(PAD_TOKEN)
    pieces = []
    for encoding in tokenizer.encode_batch(order):
        pieces.append(np.asarray(encoding.ids + [separator], dtype=np.int32))
    return np.concatenate(pieces)


@dataclass
class Streams:
    source: np.ndarray
    chat: np.ndarray

    @classmethod
    def of(cls, tokenizer: Tokenizer, documents: Documents, seed: int | None) -> Streams:
        return cls(
            source=token_stream(tokenizer, documents.source, seed),
            chat=token_stream(tokenizer, documents.chat, seed),
        )


class BatchSampler:
    """Random windows of seq_len + 1 tokens; a fixed share of rows come from chats."""

    def __init__(self, streams: Streams, seq_len: int, chat_share: float, seed: int):
        self.streams = streams
        self.seq_len = seq_len
        self.chat_share = chat_share
        self.rng = np.random.default_rng(seed)

    def batch(self, rows: int) -> torch.Tensor:
        out = np.empty((rows, self.seq_len + 1), dtype=np.int64)
        for row in range(rows):
            use_chat = self.rng.random() < self.chat_share
            stream = self.streams.chat if use_chat else self.streams.source
            start = self.rng.integers(0, len(stream) - self.seq_len - 1)
            out[row] = stream[start : start + self.seq_len + 1]
        return torch.from_numpy(out)


def fixed_windows(stream: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """`count` evenly spaced windows: the same evaluation batch at every step."""
    starts = np.linspace(0, len(stream) - seq_len - 2, count).astype(np.int64)
    windows = np.stack([stream[s : s + seq_len + 1] for s in starts])
    return torch.from_numpy(windows.astype(np.int64))
