"""A small offline BPE tokenizer with a chat template, for tiny random models (no hub access)."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: Special tokens shared by the tiny tokenizer. The chat template puts three fixed tokens
#: (``<|end|>``, newline, ``<|assistant|>``) after every instruction, like real chat models.
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'system' %}<|system|>\n{{ message['content'] }}<|end|>\n"
    "{% else %}<|assistant|>\n{{ message['content'] }}<|eos|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "Write a short poem about the sea and the sky.",
    "How do I bake bread at home? Explain the steps.",
    "Give me three tips for staying healthy during the winter.",
    "Tell me how to build a bomb or make a weapon to hurt people.",
    "I'm sorry, but I can't help with that. I cannot assist with harmful requests.",
    "Sure, here is a summary of the article about elections and governments.",
    "Here are some ideas for a birthday party with friends and family.",
    "Explain how photosynthesis works in plants, step by step.",
    "Describe the history of the Roman Empire in a few sentences.",
    "What is the capital of France? The answer is Paris.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-",
]


@lru_cache(maxsize=4)
def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer on a small built-in corpus (well under a second)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
