"""Tokenizer side of the runner: encode with `tokenizers`, each token's bytes for UTF-8-safe streaming.

Byte-level BPE tokens spell bytes with GPT-2's printable stand-ins (printable Latin-1 stands for itself, every other
byte for a character from U+0100 up, in byte order); added tokens (control and user-defined) stand for their own
text. `tests/test_export.py` checks the table against `hyperjax.io.tokenizer.Tokenizer.token_bytes`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from hyperjax.runner.format import TOKENIZER, RunnerError


def _byte_of_char() -> dict[str, int]:
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(0x100, 0x200))
    return {(chr(b) if b in printable else chr(next(shifted))): b for b in range(256)}


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer saved at `path` (tokenizer.json)."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise RunnerError(f"{path}: cannot load the tokenizer ({exc})") from None


class TokenBytes(Sequence[bytes]):
    """The bytes of every token id in one buffer (indexed by int id, not by slices): about 0.7 MB where a list of
    bytes objects costs 2.5 MB. blob: every token's bytes in id order; offsets int64 (n + 1,): token i is
    blob[offsets[i]:offsets[i + 1]]."""

    def __init__(self, blob: bytes, offsets: np.ndarray):
        self._blob = blob
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        if not -len(self) <= i < len(self):
            raise IndexError(f"token id {i} out of range for a vocabulary of {len(self)}")
        i %= len(self)
        return self._blob[self._offsets[i] : self._offsets[i + 1]]


def token_byte_table(tokenizer: Tokenizer) -> TokenBytes:
    """bytes of every token id, 0 … vocab size − 1 (an id without a token: empty).

    Built one token at a time into one buffer: a dict of the whole vocabulary would leave megabytes of freed Python
    objects that the allocator cannot hand back to the OS.
    """
    byte_of = _byte_of_char()
    added = {i: token.content for i, token in tokenizer.get_added_tokens_decoder().items()}
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    blob, offsets = bytearray(), np.zeros(size + 1, np.int64)
    for i in range(size):
        if i in added:
            blob += added[i].encode()
        elif (token := tokenizer.id_to_token(i)) is not None:
            for ch in token:
                if ch in byte_of:
                    blob.append(byte_of[ch])
                else:
                    blob += ch.encode()
        offsets[i + 1] = len(blob)
    return TokenBytes(bytes(blob), offsets)


def release_freed_memory() -> None:
    """Collect garbage and give freed heap pages back to the OS (glibc's `malloc_trim`; elsewhere freed memory
    stays with the process). A loaded tokenizer holds about 30 MB that the runner needs only until the prompt is
    encoded: dropped and released before the weights are touched, it no longer adds to the peak RSS.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def utf8(text: str) -> bytes:
    """The UTF-8 bytes of `text`; a RunnerError for text that has none (a lone surrogate)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RunnerError(f"the prompt is not valid Unicode (lone surrogate at {exc.start})") from None


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, special tokens such as `<|im_start|>` parsed, nothing added (as the library encodes)."""
    utf8(text)
    return tokenizer.encode(text, add_special_tokens=False).ids


BYTE_TOKENS = TokenBytes(bytes(range(256)), np.arange(257, dtype=np.int64))  # a byte model's vocabulary


def prompt_tokens(directory: Path, info: dict, text: str) -> tuple[list[int], TokenBytes]:
    """The prompt's token ids and every token's bytes, for the export's tokenizer (manifest `tokenizer`): "bytes" (a
    byte model: the UTF-8 bytes are the tokens) or the `tokenizer.json` it names, released before returning."""
    if info.get("kind") == "bytes":
        return list(utf8(text)), BYTE_TOKENS
    tokenizer = load_tokenizer(Path(directory) / info.get("file", TOKENIZER))
    ids, table = encode(tokenizer, text), token_byte_table(tokenizer)
    del tokenizer
    release_freed_memory()
    return ids, table


def render_chat(template: str, user_text: str, bos: str, eos: str) -> str:
    """The prompt of one user turn rendered by the model's chat template (needs jinja2, imported only here)."""
    try:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RunnerError("--chat needs jinja2 (pip install jinja2); or pass the templated prompt") from None

    def refuse(message: str) -> None:
        raise RunnerError(f"the model's chat template refused the message: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = refuse
    messages = [{"role": "user", "content": user_text}]
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
        )
    except TemplateError as exc:
        raise RunnerError(f"the model's chat template failed to render: {exc}") from None
