"""A byte-level tokenizer with the project's tags as single tokens, for tiny test models.

It needs no files, so tests and `configs/tiny.yaml` run anywhere in seconds. It offers the
small part of the Hugging Face tokenizer interface that this project uses: `encode`,
`decode`, `batch_decode`, `eos_token_id`, `pad_token_id`, `convert_tokens_to_ids`,
`__len__`. Ids 0..255 are raw UTF-8 bytes; the special tokens follow.

`continuation_ids` and `first_token` work with any tokenizer (this one or a Hugging Face one): which
token a continuation starts with right after a context (the fork of a thought, an answer to score).
"""
from __future__ import annotations

import re

# ChatML markers first (as in SmolLM2), then the tags of the tool protocol.
SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>",
    "<thought>", "</thought>", "<call>", "</call>", "<obs>", "</obs>", "<answer>", "</answer>",
)


class ByteTokenizer:
    """UTF-8 bytes plus `SPECIAL_TOKENS`; `<|im_end|>` is both EOS and pad, as in SmolLM2."""

    chat_template = None  # prompts are built as plain ChatML (see envs.protocol)

    def __init__(self, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
        self.special_tokens = tuple(special_tokens)
        self._special_to_id = {t: 256 + i for i, t in enumerate(self.special_tokens)}
        self._id_to_special = {i: t for t, i in self._special_to_id.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.special_tokens) + ")")
        self.eos_token = "<|im_end|>"
        self.pad_token = "<|im_end|>"
        self.eos_token_id = self._special_to_id[self.eos_token]
        self.pad_token_id = self.eos_token_id

    def __len__(self) -> int:
        return 256 + len(self.special_tokens)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self._special_to_id:
                ids.append(self._special_to_id[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for i in (int(i) for i in ids):
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self._id_to_special.get(i, ""))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._special_to_id.get(token)


# --------------------------------------------------------------------------- any tokenizer (HF or ByteTokenizer)

def continuation_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(ids of `context`, ids of `context + continuation`), checked that the first are a prefix of the
    second: a continuation that merges with the context's last token cannot be scored after it."""
    ctx = tokenizer.encode(context, add_special_tokens=False)
    full = tokenizer.encode(context + continuation, add_special_tokens=False)
    if full[:len(ctx)] != ctx:
        raise ValueError(f"the context's tokens change when {continuation!r} follows it")
    return ctx, full


def first_token(tokenizer, context: str, continuation: str) -> int:
    """The id of the token that starts `continuation` right after `context`."""
    ctx, full = continuation_ids(tokenizer, context, continuation)
    if len(full) == len(ctx):
        raise ValueError(f"the continuation {continuation!r} adds no token to the context")
    return full[len(ctx)]
