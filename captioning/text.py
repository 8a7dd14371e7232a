"""Caption post-processing: clean the model's text, flag degenerate output, count T5 tokens."""

from __future__ import annotations

import re

_ROLE_PREFIX = re.compile(r"^\s*(?:ASSISTANT|assistant|Assistant)\s*:\s*")
_SPACES = re.compile(r"\s+")
MIN_REPEATS = 4  # a tail made of one chunk repeated this often is a repetition loop
MAX_PERIOD = 120  # longest repeated chunk looked for, in characters
T5 = "T5 tokenizer"  # names it in load errors, apart from the LLaVA model


def clean_caption(text: str, prompt: str) -> str:
    """Strip whitespace, a leading role tag, and an echo of the prompt."""
    text = _ROLE_PREFIX.sub("", text.strip())
    if prompt and text.startswith(prompt):
        text = _ROLE_PREFIX.sub("", text[len(prompt):].strip())
    return text.strip()


def is_repetition_loop(text: str) -> bool:
    """True when the text ends in one chunk (1..120 chars) repeated at least 4 times in a row."""
    s = _SPACES.sub(" ", text).strip()
    for period in range(1, min(MAX_PERIOD, len(s) // MIN_REPEATS) + 1):
        chunk = s[-period:]
        if chunk.strip() and s.endswith(chunk * MIN_REPEATS):
            return True
    return False


def degenerate_reason(text: str, finish_reason: str) -> str | None:
    """'empty', 'repetition' or 'truncated' (cut off at max_new_tokens); None for a usable caption."""
    if not text.strip():
        return "empty"
    if is_repetition_loop(text):
        return "repetition"
    if finish_reason == "length":
        return "truncated"
    return None


class T5TokenCounter:
    """Counts tokens as PixArt's T5 tokenizer sees them (EOS included), to compare with the 120-token budget."""

    def __init__(self, tokenizer_id: str) -> None:
        """`tokenizer_id`: a local directory or a hub id; ModelLoadError (captioning.captioner) when it cannot load,
        at once when a hub id is not cached and the hub is unreachable."""
        from transformers import AutoTokenizer

        from captioning.captioner import TOKENIZER_FILES  # torch: load it lazily
        from storage.hub import from_pretrained, require_files

        require_files(tokenizer_id, T5, TOKENIZER_FILES, "tokenizer files")
        self.tokenizer = from_pretrained(AutoTokenizer.from_pretrained, tokenizer_id, T5, "t5_tokenizer")
        self.tokenizer.model_max_length = 1 << 30  # we count, never truncate: silence the too-long warning

    def __call__(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
