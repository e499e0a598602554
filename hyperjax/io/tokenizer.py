"""Byte-level BPE tokenizer and chat template from GGUF `tokenizer.*` metadata, read as llama.cpp reads it.

The BPE runs in HuggingFace `tokenizers`. This module assembles it from the file: vocabulary id = position in
`tokenizer.ggml.tokens`, merges as stored, the pre-tokenizer regexes that llama.cpp applies for the file's
`tokenizer.ggml.pre` (each regex splits every piece the previous one left), and control and user-defined
tokens as added tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from hyperjax.errors import InvalidPromptError, TokenizerError

# GGUF token types (llama.cpp's LLAMA_TOKEN_TYPE_*).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4


def _byte_chars() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 stays, the rest maps to U+0100 upwards."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    extra = iter(range(0x100, 0x200))
    return tuple(chr(b) if b in printable else chr(next(extra)) for b in range(256))


BYTE_CHARS = _byte_chars()
"""The character that stands for byte b in a byte-level vocabulary is BYTE_CHARS[b]."""
_BYTE_OF = {ch: b for b, ch in enumerate(BYTE_CHARS)}

# llama.cpp's pre-tokenizer regexes per `tokenizer.ggml.pre`, applied in order.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2)
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT,
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), (_GPT2,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe"), (_LLAMA3,)),
}
# Pre-types for which llama.cpp takes a whole pre-token from the vocabulary before trying merges.
_IGNORE_MERGES = frozenset({"llama3", "llama-v3", "llama-bpe"})
# Texts of the end-of-turn tokens llama.cpp recognises by name when the file names no EOT id.
_END_OF_TURN_TEXTS = frozenset({"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"})


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in _PRE_SPLITS:
        supported = ", ".join(sorted(_PRE_SPLITS))
        raise TokenizerError(f"tokenizer.ggml.pre {pre!r} is not supported (supported: {supported})")
    splits = [pre_tokenizers.Split(Regex(pattern), "isolated") for pattern in _PRE_SPLITS[pre]]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level])


def _optional_id(metadata: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not 0 <= int(value) < vocab_size:
        raise TokenizerError(f"{key} = {value} is outside the vocabulary of {vocab_size} tokens")
    return int(value)


class Tokenizer:
    """Encode, decode and chat-template rendering for a GGUF byte-level BPE (`tokenizer.ggml.model` = gpt2).

    Control tokens (`<|im_start|>`, ...) are matched in text only when `parse_special` is set; user-defined
    tokens are always matched, as llama.cpp does.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int] | None = None,
        *,
        pre: str = "default",
        bos_id: int | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
        chat_template: str | None = None,
    ):
        if not tokens:
            raise TokenizerError("the tokenizer has no tokens")
        types = list(token_types) if token_types is not None else [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(f"{len(types)} token types for {len(tokens)} tokens")
        pairs = [_merge_pair(merge) for merge in merges]
        try:
            bpe = models.BPE(
                vocab={token: i for i, token in enumerate(tokens)},
                merges=pairs,
                ignore_merges=pre in _IGNORE_MERGES,
            )
        except Exception as exc:  # tokenizers raises a bare Exception for merges of unknown tokens
            raise TokenizerError(f"cannot build the BPE from the vocabulary and merges: {exc}") from exc
        pre_tokenizer = _pre_tokenizer(pre)
        user_ids = [i for i, t in enumerate(types) if t == USER_DEFINED]
        user_defined = [AddedToken(tokens[i], normalized=False) for i in user_ids]
        self.special_ids = frozenset(i for i, t in enumerate(types) if t in (UNKNOWN, CONTROL))
        control = [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(self.special_ids)]
        self._special_hf, self._plain_hf = HFTokenizer(bpe), HFTokenizer(bpe)
        for hf, added in ((self._special_hf, [*user_defined, *control]), (self._plain_hf, user_defined)):
            hf.pre_tokenizer = pre_tokenizer
            hf.add_tokens(added)
        self._bytes = [
            token.encode() if t in (UNKNOWN, CONTROL, USER_DEFINED) else _token_bytes(token)
            for token, t in zip(tokens, types, strict=True)
        ]
        self._texts = list(tokens)
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        named = {i for i in self.special_ids if tokens[i] in _END_OF_TURN_TEXTS}
        self.eot_ids = frozenset(named | {i for i in (eos_id, eot_id) if i is not None})
        self.chat_template = chat_template

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF metadata mapping (`tokenizer.ggml.*` keys, plain Python values)."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(f"tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
        tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise TokenizerError("the model file has no tokenizer.ggml.tokens")
        types = metadata.get("tokenizer.ggml.token_type")
        return cls(
            tokens,
            list(metadata.get("tokenizer.ggml.merges") or []),
            [int(t) for t in types] if types is not None else None,
            pre=str(metadata.get("tokenizer.ggml.pre") or "default"),
            bos_id=_optional_id(metadata, "tokenizer.ggml.bos_token_id", len(tokens)),
            eos_id=_optional_id(metadata, "tokenizer.ggml.eos_token_id", len(tokens)),
            eot_id=_optional_id(metadata, "tokenizer.ggml.eot_token_id", len(tokens)),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; with `parse_special`, `<|im_start|>` and the like become their single ids.

        A byte that has no token of its own in the vocabulary is left out, as llama.cpp does.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidPromptError(f"text is not valid Unicode (lone surrogate at {exc.start})") from None
        hf = self._special_hf if parse_special else self._plain_hf
        ids = hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def to_json(self) -> str:
        """The `tokenizers` serialization (tokenizer.json) of the encoder that parses special tokens."""
        return self._special_hf.to_str()

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of one token, as stored in the file (e.g. '<|im_end|>')."""
        return self._texts[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token (byte-level mapping undone); control and user-defined tokens give their text."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary of {self.vocab_size} tokens")
        return self._bytes[token_id]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        kept = (i for i in ids if not (skip_special and i in self.special_ids))
        return b"".join(self.token_bytes(i) for i in kept).decode("utf-8", errors="replace")

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render `messages` ({"role", "content"} dicts) with the file's jinja2 chat template in a sandbox."""
        if not self.chat_template:
            raise TokenizerError("this model file has no chat template (tokenizer.chat_template)")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
                raise TokenizerError(f"chat message {i} needs 'role' and 'content', got {message!r}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_template_error
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._texts[self.bos_id] if self.bos_id is not None else "",
                eos_token=self._texts[self.eos_id] if self.eos_id is not None else "",
            )
        except TemplateError as exc:
            raise TokenizerError(f"the model's chat template failed to render: {exc}") from exc


def _merge_pair(merge: str) -> tuple[str, str]:
    """Split a stored merge "left right" at its first space after the first character (as llama.cpp does)."""
    cut = merge.find(" ", 1)
    if cut < 0:
        raise TokenizerError(f"merge {merge!r} is not two tokens separated by a space")
    return merge[:cut], merge[cut + 1 :]


def _token_bytes(token: str) -> bytes:
    """Bytes of a byte-level token; a character outside the byte alphabet stands for its own UTF-8."""
    return b"".join(bytes((_BYTE_OF[ch],)) if ch in _BYTE_OF else ch.encode() for ch in token)


def _raise_template_error(message: str) -> None:
    raise TokenizerError(f"the model's chat template refused the messages: {message}")


class IncrementalDecoder:
    """Turns a stream of token ids into text without ever splitting a UTF-8 character across two outputs."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Text completed by this token; bytes of a character still incomplete are held back."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back (an unfinished character becomes U+FFFD); the decoder starts afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
