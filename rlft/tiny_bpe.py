"""A real-shaped tokenizer trained here, offline, next to `rlft.tiny`'s byte-level one.

The byte-level tokenizer has one token per character, so tests on it never see what real
tokenizers do: tokens of several characters (a stop string or an answer split across tokens),
characters outside the learned merges falling back to one token per UTF-8 byte (decoding half of
them gives a partial UTF-8 sequence), an eos that is not the pad token, and a chat template with
a system turn and no `{% generation %}` markers (assistant masks come from prefix renderings).

`build_bpe_tokenizer` trains a small byte-level BPE with `tokenizers` on text rlft generates
itself (worked arithmetic, GSM8K-shaped word problems, the reasoning tags), deterministically for
a given `tokenizers` version. Its pipeline is Qwen2's (NFC, Qwen's split regex, GPT-2 byte
alphabet, merges), so a qwen2 or llama model directory saved with it reloads through
`AutoTokenizer` as the same tokenizer (transformers rebuilds a qwen2 directory's tokenizer as
`Qwen2Tokenizer` around the saved vocabulary and merges).
"""

from __future__ import annotations

import random
from typing import Any

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD)
VOCAB_SIZE = 900  # specials + 256 byte tokens + learned merges
# Qwen2's pre-tokenizer split (the same as rlft.tiny's).
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A system turn and no generation markers: each turn ends in eos (<|im_end|>) and a newline.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_NAMES = ("Natalia", "Weng", "Betty", "Julie", "James", "Mark", "Albert", "Ken", "Alexis", "Tina")
_THINGS = ("clips", "apples", "books", "eggs", "stamps", "marbles", "cookies", "pencils")


def training_corpus(n: int = 400) -> list[str]:
    """Lines the tokenizer learns from: word problems, worked answers, tagged replies (ASCII only,
    so any other character is encoded as its UTF-8 bytes)."""
    rng = random.Random(0)
    lines: list[str] = []
    for _ in range(n):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        lines.append(f"{name} has {a} {thing} and buys {b} more. Each costs ${c}. How much did the {thing} cost?")
        lines.append(f"<think>{a} + {b} = {a + b}, and {a + b} * {c} = {(a + b) * c}.</think> "
                     f"<answer>{(a + b) * c}</answer>")
        lines.append(f"{name} paid {a}+{b} = <<{a}+{b}={a + b}>>{a + b} dollars.\n#### {a + b}")
        lines.append(f"What is {a}+{b}? Think step by step, then give only the final number.")
    return lines


def build_bpe_tokenizer() -> Any:
    """A byte-level BPE tokenizer with multi-character tokens, byte fallback (every byte has a
    token), eos `<|im_end|>` != pad `<|pad|>`, no bos, and `CHAT_TEMPLATE`.

    Ids 0-3 are the special tokens, as in `rlft.tiny.build_tokenizer`.

    Returns:
        A `transformers` fast tokenizer with the chat template set.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(training_corpus(), trainer=trainer)
    return fast_tokenizer(backend, CHAT_TEMPLATE)


def fast_tokenizer(backend: Any, chat_template: str) -> Any:
    """A `tokenizers` backend with the four special tokens added, as a transformers fast tokenizer
    (eos `<|im_end|>`, pad `<|pad|>`, no bos or unk) with `chat_template`; the tiny tokenizers' one wrapper."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
