"""tokenizer.json + tokenizer_config.json rebuilt from a GGUF's tokenizer.ggml.* metadata.

Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is rebuilt exactly when its
`pre` names a pre-tokenizer we know (the regex split llama.cpp applies for that
name, written as the Hugging Face pre-tokenizer the original model ships).
Anything else would tokenize differently from the original model without any
error, so it is refused with a message asking for --tokenizer (the original
model's files). Token types map as llama.cpp's converter wrote them: NORMAL ->
the BPE vocabulary, CONTROL -> special added tokens, USER_DEFINED -> added tokens
that decode as text; `[PADn]` fillers of a padded vocabulary are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from .gguf_file import GGUFError, GGUFModel

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
            "use_regex": use_regex}


def _split_then_bytes(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
         "invert": False},
        _byte_level(False),
    ]}


# pre name -> (normalizer, pre_tokenizer, ignore_merges), as the originals ship them.
PRE_TOKENIZERS: dict[str, tuple[dict | None, dict, bool]] = {
    "qwen2": ({"type": "NFC"}, _split_then_bytes(_QWEN2_SPLIT), False),
    "llama-bpe": (None, _split_then_bytes(_LLAMA3_SPLIT), True),
    "smollm": (None, {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]}, False),
    "gpt-2": (None, _byte_level(True), False),
}


class TokenizerRebuildError(GGUFError):
    """The GGUF's tokenizer cannot be rebuilt exactly; ask for --tokenizer."""


def _meta(model: GGUFModel, key: str, default=None):
    return model.metadata.get(f"tokenizer.ggml.{key}", default)


def _refuse(model: GGUFModel, why: str) -> TokenizerRebuildError:
    return TokenizerRebuildError(
        f"{model.files[0].name}: {why}; its tokenizer cannot be rebuilt exactly, pass "
        "--tokenizer HF_ID_OR_DIR (the original model's tokenizer files)")


def _is_filler(token: str, index: int, kind: int) -> bool:
    return kind in (USER_DEFINED, UNUSED) and token == f"[PAD{index}]"


def build_tokenizer_files(model: GGUFModel) -> dict[str, dict]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...} (raises TokenizerRebuildError)."""
    kind = _meta(model, "model")
    if kind is None:
        raise _refuse(model, "it has no tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_files(model)
    if kind != "gpt2":
        raise _refuse(model, f"tokenizer.ggml.model {kind!r} is neither byte-level BPE (gpt2) "
                      "nor SentencePiece (llama)")
    pre = _meta(model, "pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise _refuse(model, f"pre-tokenizer {pre!r} is not one we rebuild "
                      f"({', '.join(PRE_TOKENIZERS)})")
    tokens = _meta(model, "tokens")
    types = _meta(model, "token_type") or [NORMAL] * len(tokens or [])
    merges = _meta(model, "merges")
    if not tokens or merges is None or len(types) != len(tokens):
        raise _refuse(model, "tokens, token types or merges are missing")
    normalizer, pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    vocab, added = {}, []
    for i, (token, t) in enumerate(zip(tokens, types, strict=True)):
        if _is_filler(token, i, t):
            continue
        vocab[token] = i
        if t in (CONTROL, USER_DEFINED):
            added.append({"id": i, "content": token, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": t == CONTROL})
    add_bos = bool(_meta(model, "add_bos_token", False))
    bos = _token(model, tokens, "bos_token_id")
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(add_bos, bos, vocab),
        "decoder": _byte_level(True),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    config = {
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                 for a in added},
        "bos_token": bos,
        "eos_token": _token(model, tokens, "eos_token_id"),
        "pad_token": _token(model, tokens, "padding_token_id"),
        "unk_token": _token(model, tokens, "unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = model.metadata.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def _sentencepiece_merges(vocab: dict[str, int], scores: list[float]) -> list[list[str]]:
    """BPE merges of a SentencePiece vocabulary, as Hugging Face's LlamaConverter makes
    them: every split of a piece into two pieces of the vocabulary, ordered by the
    merged piece's score (highest first), ties by the pieces' ids."""
    merges = []
    for piece, index in sorted(vocab.items(), key=lambda kv: kv[1]):
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((left, right, scores[index]) for left, right in local)
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: keeps the id order of ties
    return [[left, right] for left, right, _ in merges]


def _sentencepiece_files(model: GGUFModel) -> dict[str, dict]:
    """A SentencePiece BPE vocabulary (llama, mistral) as the byte-fallback BPE
    tokenizer.json Hugging Face's LlamaTokenizerFast uses."""
    tokens, scores = _meta(model, "tokens"), _meta(model, "scores")
    types = _meta(model, "token_type")
    if not tokens or not scores or not types or not len(tokens) == len(scores) == len(types):
        raise _refuse(model, "its SentencePiece tokens, scores or types are missing")
    normal = [s for s, t in zip(scores, types, strict=True) if t == NORMAL]
    if len(set(normal)) < max(2, len(normal) // 2):
        raise _refuse(model, "its SentencePiece scores do not order the merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": t != USER_DEFINED}
             for i, (tok, t) in enumerate(zip(tokens, types, strict=True))
             if t in (CONTROL, USER_DEFINED, UNKNOWN)]
    add_bos = bool(_meta(model, "add_bos_token", True))
    bos, unk = _token(model, tokens, "bos_token_id"), _token(model, tokens, "unknown_token_id")
    if _meta(model, "add_space_prefix", True) is False:
        raise _refuse(model, "a SentencePiece vocabulary without the space prefix")
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": _post_processor(add_bos, bos, vocab) if add_bos else None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk,
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": _sentencepiece_merges(vocab, scores),
        },
    }
    config = {
        "add_bos_token": add_bos, "add_eos_token": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                 for a in added},
        "bos_token": bos, "eos_token": _token(model, tokens, "eos_token_id"),
        "unk_token": unk, "pad_token": _token(model, tokens, "padding_token_id"),
        "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = model.metadata.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def _token(model: GGUFModel, tokens: list[str], key: str) -> str | None:
    index = _meta(model, key)
    if index is None or not 0 <= int(index) < len(tokens):
        return None
    return tokens[int(index)]


def _post_processor(add_bos: bool, bos: str | None, vocab: dict) -> dict:
    if not add_bos or bos is None:
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                "use_regex": False}
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
    }


def eos_token_ids(model: GGUFModel) -> list[int]:
    """Every id that ends a turn: eos, and eot/eom where the GGUF names them."""
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = _meta(model, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def write_tokenizer_files(model: GGUFModel, out_dir: Path) -> None:
    for name, data in build_tokenizer_files(model).items():
        (out_dir / name).write_text(json.dumps(data, ensure_ascii=False, indent=1))
