"""Byte-level BPE tokenizer and chat template built from a GGUF file's `tokenizer.*` metadata.

The BPE itself runs in HuggingFace `tokenizers`; this module only assembles it from the file (vocabulary = token
list order, merges as stored, control and user-defined tokens as special tokens) and picks the pre-tokenizer that
llama.cpp uses for the file's `tokenizer.ggml.pre`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from hyperjax.errors import TokenizerError

CONTROL, USER_DEFINED = 3, 4
# End-of-turn markers beyond the file's EOS that chat models emit.
_END_OF_TURN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")
# GPT-2's split: contractions, letter runs, digit runs, other symbols, whitespace not followed by a word.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama-3's split (also used by several newer gpt2-style vocabularies): digit runs of at most three.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's pre-tokenization for `tokenizer.ggml.pre`: SmolLM splits every digit, then splits like GPT-2."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":
        split = [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Split(Regex(_GPT2_SPLIT), "isolated")]
    elif pre in ("gpt2", "default", "gpt-2"):
        split = [pre_tokenizers.Split(Regex(_GPT2_SPLIT), "isolated")]
    elif pre in ("llama3", "llama-bpe", "smaug-bpe"):
        split = [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated")]
    else:
        raise TokenizerError(f"pre-tokenizer {pre!r} is not supported (supported: smollm, gpt2, llama3)")
    return pre_tokenizers.Sequence([*split, byte_level])


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte → printable-character map used in byte-level vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    """Encode, decode and chat-template rendering for a GGUF `gpt2`-model vocabulary."""

    def __init__(self, metadata: Mapping[str, Any]):
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(f"tokenizer model {model!r} is not supported (hyperjax reads byte-level BPE 'gpt2')")
        tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
        merges: list[str] = list(metadata.get("tokenizer.ggml.merges") or [])
        if not tokens:
            raise TokenizerError("the model file has no tokenizer.ggml.tokens")
        types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if len(types) != len(tokens):
            raise TokenizerError(f"{len(types)} token types for {len(tokens)} tokens")
        try:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
            bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, fuse_unk=False)
        except Exception as exc:  # tokenizers raises its own Exception subclass for malformed vocabularies
            raise TokenizerError(f"cannot build the BPE from the file's vocabulary and merges: {exc}") from exc
        self._hf = HFTokenizer(bpe)
        self._hf.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt2")))
        self._hf.decoder = decoders.ByteLevel()
        self.special_ids = frozenset(i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED))
        self._hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in self.special_ids])
        self._tokens = tokens
        self._bytes_of = _byte_decoder()
        self.vocab_size = len(tokens)
        self.bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        self.eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        ends = {i for i in self.special_ids if tokens[i] in _END_OF_TURN_TEXTS}
        self.eot_ids = frozenset(ends | ({self.eos_id} if self.eos_id is not None else set()))
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        return cls(metadata)

    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. With parse_special, `<|im_start|>` and the like become their single ids."""
        ids = self._hf.encode(text, add_special_tokens=False).ids if parse_special else self._encode_plain(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Encode with special-token texts treated as ordinary characters."""
        pieces = self._hf.pre_tokenizer.pre_tokenize_str(text)
        model = self._hf.model
        return [token.id for piece, _ in pieces for token in model.tokenize(piece)]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for; a special token gives its text."""
        text = self._tokens[token_id]
        if token_id in self.special_ids:
            return text.encode("utf-8")
        try:
            return bytes(self._bytes_of[ch] for ch in text)
        except KeyError:
            return text.encode("utf-8")

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        data = b"".join(self.token_bytes(i) for i in ids if not (skip_special and i in self.special_ids))
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's own jinja2 chat template, in a sandbox."""
        if not self.chat_template:
            raise TokenizerError("this model file has no chat template (tokenizer.chat_template)")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise TokenizerError(f"chat message {i} needs 'role' and 'content', got {message!r}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._tokens[self.bos_id] if self.bos_id is not None else "",
                eos_token=self._tokens[self.eos_id] if self.eos_id is not None else "",
            )
        except TemplateError as exc:
            raise TokenizerError(f"the model's chat template failed to render: {exc}") from exc
