"""Byte-level BPE, trained once per study on the real training split.

One special token, `<|endoftext|>`, separates stories and serves as both BOS and EOS
(the GPT-2 / TinyStories convention), so a story is [EOT] text [EOT]; `<|pad|>` pads
batches and is never predicted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [END_OF_TEXT, PAD]
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte


def minimum_vocab_size() -> int:
    return BYTE_ALPHABET + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A transformers fast tokenizer trained with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT,
                                   eos_token=END_OF_TEXT, pad_token=PAD)


def load_tokenizer(directory: Path | str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(directory))
    if tok.eos_token is None:
        tok.eos_token = END_OF_TEXT if END_OF_TEXT in tok.get_vocab() else tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
