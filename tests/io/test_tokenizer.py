"""Tokenizer: llama.cpp parity on SmolLM2, round trips, special tokens, chat template, streaming decode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperjax.errors import InvalidPromptError, TokenizerError
from hyperjax.io.tokenizer import BYTE_CHARS, CONTROL, NORMAL, USER_DEFINED, IncrementalDecoder, Tokenizer

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Every key/value field of a GGUF file as plain Python values."""
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata(smollm2_path))


@pytest.fixture(scope="module")
def reference(shared_dir: Path) -> list[dict[str, Any]]:
    return json.loads((shared_dir / "reference" / "smollm2_q4_1_llamacpp.json").read_text())["cases"]


def tiny(
    extra: list[str],
    merges: list[str],
    *,
    pre: str = "smollm",
    types: dict[int, int] | None = None,
    **metadata: Any,
) -> Tokenizer:
    """A byte-level tokenizer: the 256 byte tokens, then `extra`, with `types` overriding NORMAL by id."""
    tokens = [*BYTE_CHARS, *extra]
    token_types = [(types or {}).get(i, NORMAL) for i in range(len(tokens))]
    return Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": token_types,
            "tokenizer.ggml.merges": merges,
            **metadata,
        }
    )


def ids_of(extra: list[str], *texts: str) -> list[int]:
    """Ids in a `tiny` vocabulary of tokens given by their byte-level text (e.g. 'Ġb')."""
    return [[*BYTE_CHARS, *extra].index(text) for text in texts]


# --- SmolLM2 against llama.cpp --------------------------------------------------------------------


@pytest.mark.model
def test_prompt_ids_match_llama_cpp(smollm2: Tokenizer, reference: list[dict[str, Any]]) -> None:
    for case in reference:
        assert smollm2.encode(case["prompt"]) == case["prompt_tokens"], case["prompt"]


@pytest.mark.model
def test_reference_ids_decode_to_reference_text(smollm2: Tokenizer, reference: list[dict[str, Any]]) -> None:
    for case in reference:
        ids = case["prompt_tokens"] + case["greedy_tokens"]
        assert smollm2.decode(ids) == case["prompt"] + case["greedy_text"]
        assert smollm2.decode(smollm2.encode(case["prompt"])) == case["prompt"]


@pytest.mark.model
def test_smollm2_special_ids(smollm2: Tokenizer) -> None:
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id) == (1, 2)
    assert smollm2.eot_ids == {0, 2}  # <|endoftext|> and <|im_end|> (the EOS)
    assert smollm2.encode("hi", add_bos=True)[0] == 1
    assert smollm2.encode("hi", add_bos=True)[1:] == smollm2.encode("hi")


@pytest.mark.model
def test_digits_are_split_one_by_one(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("12345")
    assert len(ids) == 5
    assert [smollm2.token_bytes(i) for i in ids] == [b"1", b"2", b"3", b"4", b"5"]


@pytest.mark.model
def test_special_tokens_parsed_only_when_asked(smollm2: Tokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>"
    parsed = smollm2.encode(text)
    assert parsed[0] == 1 and parsed[-1] == 2
    plain = smollm2.encode(text, parse_special=False)
    assert not set(plain) & smollm2.special_ids
    assert smollm2.decode(plain) == text
    assert smollm2.decode(parsed, skip_special=True) == "user\nhi"


@pytest.mark.model
def test_token_bytes(smollm2: Tokenizer) -> None:
    assert smollm2.token_bytes(2) == b"<|im_end|>"
    assert b"".join(smollm2.token_bytes(i) for i in smollm2.encode(" héllo 👋")) == " héllo 👋".encode()
    for bad in (-1, smollm2.vocab_size):
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            smollm2.token_bytes(bad)


@pytest.mark.model
def test_bytes_outside_the_vocabulary_are_dropped(smollm2: Tokenizer) -> None:
    # As in llama.cpp: a byte with no token of its own is left out rather than mapped to an unknown token.
    assert smollm2.encode("a\x04b") == smollm2.encode("a") + smollm2.encode("b")
    assert smollm2.decode(smollm2.encode("\U00040000")) == "\ufffd" * 3  # lead byte 0xF1 has no token


@pytest.mark.model
def test_lone_surrogate_is_invalid_prompt(smollm2: Tokenizer) -> None:
    with pytest.raises(InvalidPromptError, match="surrogate"):
        smollm2.encode("a\ud800b")


@pytest.mark.model
def test_chat_template_renders_chatml(smollm2: Tokenizer, reference: list[dict[str, Any]]) -> None:
    question = "What is the largest planet in the solar system?"
    rendered = smollm2.apply_chat_template([{"role": "user", "content": question}])
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith(reference[5]["prompt"])  # the chat case of the reference
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    rendered = smollm2.apply_chat_template(own_system, add_generation_prompt=False)
    assert rendered == f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"


# --- construction and errors (tiny vocabularies) --------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"tokenizer.ggml.model": "llama"}, "'llama' is not supported"),
        ({"tokenizer.ggml.pre": "tekken"}, "'tekken' is not supported"),
        ({"tokenizer.ggml.tokens": []}, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.merges": ["Ġt"]}, "not two tokens"),
        ({"tokenizer.ggml.merges": ["Ġ q"]}, "cannot build the BPE"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "2 token types for 257 tokens"),
        ({"tokenizer.ggml.eos_token_id": 999}, "eos_token_id = 999 is outside"),
    ],
)
def test_bad_metadata_raises_tokenizer_error(metadata: dict[str, Any], match: str) -> None:
    base = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": [*BYTE_CHARS, "Ġt"],
        "tokenizer.ggml.merges": ["Ġ t"],
    }
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_gguf_metadata(base | metadata)


@pytest.mark.parametrize(
    ("pre", "text", "pieces"),
    [
        ("smollm", "12345", ["1", "2", "3", "4", "5"]),  # every digit alone
        ("gpt-2", "12345", ["12", "34", "5"]),  # one run of digits, merged by rank
        ("llama-bpe", "12345", ["123", "4", "5"]),  # runs of at most three digits
        ("default", "12345", ["123", "4", "5"]),  # digit runs cut into threes
        ("gpt-2", "'s", ["'s"]),  # contractions stay whole
        ("smollm", "'s", ["'s"]),
        ("default", "'s", ["'", "s"]),  # punctuation is split off first
        ("smollm", "a  b", ["a", "Ġ", "Ġb"]),  # a run of spaces leaves its last space to the word
    ],
)
def test_pre_tokenizer_follows_llama_cpp_pre_type(pre: str, text: str, pieces: list[str]) -> None:
    extra = ["12", "123", "34", "'s", "Ġb"]
    tok = tiny(extra, ["3 4", "1 2", "12 3", "' s", "Ġ b"], pre=pre)
    assert tok.encode(text) == ids_of(extra, *pieces)
    assert tok.decode(tok.encode(text)) == text


def test_llama3_takes_whole_words_from_the_vocabulary() -> None:
    # llama.cpp ignores merges for llama-bpe when the whole pre-token is a vocabulary entry.
    assert tiny(["abc"], [], pre="llama-bpe").encode("abc") == [256]
    assert tiny(["abc"], [], pre="gpt-2").encode("abc") == ids_of([], "a", "b", "c")


def test_user_defined_tokens_always_parsed_control_tokens_on_request() -> None:
    tok = tiny(["<ctl>", "<usr>"], [], types={256: CONTROL, 257: USER_DEFINED})
    assert tok.encode("a<ctl>b<usr>") == [*ids_of([], "a"), 256, *ids_of([], "b"), 257]
    plain = tok.encode("a<ctl>b<usr>", parse_special=False)
    assert plain[-1] == 257 and 256 not in plain
    assert tok.decode([256, 257]) == "<ctl><usr>"
    assert tok.decode([256, 257], skip_special=True) == "<usr>"


def test_eot_ids_collect_eos_eot_and_end_of_turn_texts() -> None:
    tok = tiny(
        ["<|im_end|>", "<|endoftext|>", "<stop>", "<eos>"],
        [],
        types={256: CONTROL, 257: CONTROL, 258: CONTROL, 259: CONTROL},
        **{"tokenizer.ggml.eos_token_id": 259, "tokenizer.ggml.eot_token_id": 258},
    )
    assert tok.eot_ids == {256, 257, 258, 259}
    assert tiny([], []).eot_ids == frozenset()


def test_chat_template_errors() -> None:
    with pytest.raises(TokenizerError, match="no chat template"):
        tiny([], []).apply_chat_template([{"role": "user", "content": "hi"}])
    chatml = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = tiny([], [], **{"tokenizer.chat_template": chatml})
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\n"
    with pytest.raises(TokenizerError, match="needs 'role' and 'content'"):
        tok.apply_chat_template([{"role": "user"}])
    refusing = "{{ raise_exception('system role not supported') }}"
    tok = tiny([], [], **{"tokenizer.chat_template": refusing})
    with pytest.raises(TokenizerError, match="system role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    escaping = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    tok = tiny([], [], **{"tokenizer.chat_template": escaping})
    with pytest.raises(TokenizerError, match="failed to render"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_incremental_decoder_holds_back_partial_characters() -> None:
    tok = tiny([], [])
    decoder = IncrementalDecoder(tok)
    euro = "€".encode()  # three bytes, three byte tokens
    assert [decoder.feed(b) for b in euro] == ["", "", "€"]
    assert decoder.feed(euro[0]) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.feed(ord("a")) == "a"  # flush started afresh


# --- properties on SmolLM2 ------------------------------------------------------------------------

# SmolLM2's vocabulary has no token for the bytes 0x04 0x06 0x13 0x14 0x16 0x1D 0xF1 0xF2 (nor for bytes never
# seen in UTF-8): text with such a byte does not round-trip (test_bytes_outside_the_vocabulary_are_dropped).
_MISSING = "\x04\x06\x13\x14\x16\x1d"
_CHARS = st.one_of(
    st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_characters=_MISSING),  # lead byte <= 0xF0
    st.characters(codec="utf-8", min_codepoint=0xC0000),  # lead byte 0xF3 or 0xF4
    st.sampled_from("0123456789"),
    st.sampled_from(" \t\n\r\u00a0\u3000"),
    st.sampled_from("👋🏽🎉🇫🇷👨‍👩‍👧世界日本語한국어éa\u0301\u0308\u200d"),
)
TEXT = st.lists(st.one_of(st.text(_CHARS, max_size=12), st.sampled_from(SPECIALS)), max_size=6).map("".join)


@pytest.mark.model
@settings(max_examples=50, deadline=None)
@given(text=TEXT, parse_special=st.booleans())
def test_decode_inverts_encode(smollm2: Tokenizer, text: str, parse_special: bool) -> None:
    assert smollm2.decode(smollm2.encode(text, parse_special=parse_special)) == text


@pytest.mark.model
@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=24))
def test_incremental_decoder_concatenates_to_decode(smollm2: Tokenizer, ids: list[int]) -> None:
    decoder = IncrementalDecoder(smollm2)
    assert "".join(decoder.feed(i) for i in ids) + decoder.flush() == smollm2.decode(ids)


def _longest_valid_prefix(data: bytes) -> str:
    for end in range(len(data), -1, -1):
        try:
            return data[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError("unreachable: the empty prefix is valid")


@pytest.mark.model
@settings(max_examples=50, deadline=None)
@given(text=st.text(st.sampled_from("👋🏽🎉🇫🇷世界語한ñ\u0301 a1"), max_size=16))
def test_incremental_decoder_never_emits_partial_characters(smollm2: Tokenizer, text: str) -> None:
    decoder, emitted, seen = IncrementalDecoder(smollm2), "", b""
    for token in smollm2.encode(text):
        emitted += decoder.feed(token)
        seen += smollm2.token_bytes(token)
        assert emitted == _longest_valid_prefix(seen)
    assert emitted + decoder.flush() == text
