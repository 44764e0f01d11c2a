"""Small tokenizers trained inside the tests (no downloads), shared by the detokenizer tests."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def train_byte_level(corpus: Sequence[str]) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE with <|im_end|> as EOS: every byte is a token, so emoji and
    accented letters split into byte pieces."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    raw.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>")
