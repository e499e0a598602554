"""GGUF reader and writer: round trips, and a named error for every kind of damaged or foreign file."""

from __future__ import annotations

import itertools
import mmap
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperjax.errors import GGUFError, ModelNotFoundError, UnsupportedArchitectureError, UnsupportedTensorTypeError
from hyperjax.io.gguf import describe, read_gguf, release_pages, write_gguf

QUANT = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34)}
METADATA = {
    "general.name": "tiny",
    "general.description": "",
    "llama.block_count": 2,
    "llama.rope.freq_base": 10000.0,
    "llama.attention.layer_norm_rms_epsilon": float(np.float32(1e-5)),
    "test.negative": -7,
    "test.large": 2**40,
    "test.flag": True,
    "tokenizer.ggml.tokens": ["a", "Ġb", "<|im_end|>", "é✓"],
    "tokenizer.ggml.token_type": [1, 1, 3, 1],
    "tokenizer.ggml.merges": ["a Ġb"],
    "tokenizer.ggml.scores": [0.0, -1.5, 2.25, 3.0],
    "test.flags": [True, False],
}
_SEQ = itertools.count()


def _raw_blocks(rng: np.random.Generator, rows: int, cols: int, ggml_type: str) -> np.ndarray:
    block, block_bytes = QUANT[ggml_type]
    return rng.integers(0, 256, (rows, cols // block * block_bytes), dtype=np.uint8)


def _tensors(seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "norm.weight": ("F32", rng.standard_normal(48).astype(np.float32)),
        "proj.weight": ("F32", rng.standard_normal((3, 5)).astype(np.float32)),
        "half.weight": ("F16", rng.standard_normal((4, 6)).astype(np.float16)),
        "q40.weight": ("Q4_0", _raw_blocks(rng, 3, 64, "Q4_0")),
        "q41.weight": ("Q4_1", _raw_blocks(rng, 5, 96, "Q4_1")),
        "q80.weight": ("Q8_0", _raw_blocks(rng, 2, 32, "Q8_0")),
    }


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "sample.gguf", "llama", METADATA, _tensors())


def _patched(tmp_path: Path, source: Path, offset: int, fmt: str, value: int) -> Path:
    raw = bytearray(source.read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    out = tmp_path / f"patched-{next(_SEQ)}.gguf"
    out.write_bytes(bytes(raw))
    return out


def _tensor_info_offset(path: Path, name: str) -> int:
    """Offset of the n_dims field of tensor `name` in the tensor table (u64 length, name, u32 n_dims, ...)."""
    raw = path.read_bytes()
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = raw.index(key)
    return pos + len(key)


def test_round_trip_data_shapes_and_metadata(sample: Path) -> None:
    f = read_gguf(sample, architectures=("llama",))
    assert f.architecture == "llama"
    assert f.path == sample
    for key, value in METADATA.items():
        assert f.metadata[key] == value, key
    assert not any(key.startswith("GGUF.") for key in f.metadata)
    expected = _tensors()
    assert list(f.tensors) == list(expected)
    file_bytes = sample.read_bytes()
    for name, (ggml_type, array) in expected.items():
        t = f.tensors[name]
        assert t.name == name and t.ggml_type == ggml_type
        assert t.data.shape == array.shape and t.data.dtype == array.dtype
        np.testing.assert_array_equal(t.data, array)
        assert file_bytes[t.offset : t.offset + t.nbytes] == array.tobytes()
        assert t.nbytes == array.nbytes
        if ggml_type in QUANT:
            block, block_bytes = QUANT[ggml_type]
            assert t.shape == (array.shape[0], array.shape[1] // block_bytes * block)
            assert gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[ggml_type]).shape == t.shape
        else:
            assert t.shape == array.shape
    assert f.tensors["proj.weight"].shape == (3, 5)  # row-major: GGUF stores ne = (5, 3)


def test_writer_value_types(sample: Path) -> None:
    fields = gguf.GGUFReader(sample).fields
    vt = gguf.GGUFValueType
    assert fields["llama.block_count"].types == [vt.UINT32]
    assert fields["test.negative"].types == [vt.INT32]
    assert fields["test.large"].types == [vt.UINT64]
    assert fields["llama.rope.freq_base"].types == [vt.FLOAT32]
    assert fields["test.flag"].types == [vt.BOOL]
    assert fields["tokenizer.ggml.tokens"].types == [vt.ARRAY, vt.STRING]
    assert fields["tokenizer.ggml.token_type"].types == [vt.ARRAY, vt.INT32]
    assert fields["tokenizer.ggml.scores"].types == [vt.ARRAY, vt.FLOAT32]


def test_data_is_memory_mapped_and_read_only(sample: Path) -> None:
    t = read_gguf(sample).tensors["q41.weight"]
    base = t.data
    while not isinstance(base, mmap.mmap):
        base = base.base
        assert base is not None, "tensor data is a copy, not a view of the file map"
    assert not t.data.flags.writeable
    before = t.data.copy()
    release_pages(t)
    np.testing.assert_array_equal(t.data, before)


def test_get_require_and_describe(sample: Path) -> None:
    f = read_gguf(sample)
    assert f.get("llama.block_count") == 2
    assert f.get("missing.key", 5) == 5
    assert f.require("general.name") == "tiny"
    with pytest.raises(GGUFError, match=r"missing\.key.*missing") as err:
        f.require("missing.key")
    assert str(sample) in str(err.value)
    summary = describe(f)
    assert summary["architecture"] == "llama"
    assert summary["tensors"] == 6
    assert summary["tensors_by_type"] == {"F32": 2, "F16": 1, "Q4_0": 1, "Q4_1": 1, "Q8_0": 1}
    assert summary["bytes_by_type"] == {
        "F32": 63 * 4,
        "F16": 48,
        "Q4_0": 3 * 2 * 18,
        "Q4_1": 5 * 3 * 20,
        "Q8_0": 34 * 2,
    }
    assert summary["parameters"] == 48 + 15 + 24 + 3 * 64 + 5 * 96 + 2 * 32
    assert summary["tensor_bytes"] == sum(summary["bytes_by_type"].values())


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"nope\.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError):
        read_gguf(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GG", b"GGML\x03\x00\x00\x00" + bytes(64), b"\x00" * 100])
def test_wrong_magic(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=r"not a GGUF file: magic .* at offset 0") as err:
        read_gguf(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("version", "match"), [(1, "version 1"), (4, "version 4"), (3 << 24, "big-endian")])
def test_unsupported_version(tmp_path: Path, sample: Path, version: int, match: str) -> None:
    with pytest.raises(GGUFError, match=match):
        read_gguf(_patched(tmp_path, sample, 4, "<I", version))


@pytest.fixture(scope="module")
def cut_sources(tmp_path_factory, sample: Path) -> dict[str, tuple[Path, int]]:
    """Files to truncate, with the end of their meaningful bytes (past it only alignment padding follows)."""
    no_tensors = write_gguf(
        tmp_path_factory.mktemp("gguf") / "meta.gguf", "llama", {"a": "x", "b": [1, 2, 3, 4, 5, 6, 7, 8]}, {}
    )
    tensors = read_gguf(sample).tensors.values()
    last_field = list(gguf.GGUFReader(no_tensors).fields.values())[-1]
    metadata_end = last_field.offset + sum(int(p.nbytes) for p in last_field.parts)
    return {"tensors": (sample, max(t.offset + t.nbytes for t in tensors)), "metadata": (no_tensors, metadata_end)}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["tensors", "metadata"]), fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_file_always_gguf_error(tmp_path: Path, cut_sources, which: str, fraction: float) -> None:
    source, data_end = cut_sources[which]
    raw = source.read_bytes()
    cut = int(fraction * data_end)
    path = tmp_path / f"cut-{next(_SEQ)}.gguf"
    path.write_bytes(raw[:cut])
    with pytest.raises(GGUFError) as err:
        read_gguf(path)
    assert type(err.value) is GGUFError
    assert str(path) in str(err.value)


def test_truncated_tensor_data_names_tensor_and_offsets(tmp_path: Path, sample: Path) -> None:
    last = read_gguf(sample).tensors["q80.weight"]
    end = last.offset + last.nbytes
    path = tmp_path / "cut.gguf"
    path.write_bytes(sample.read_bytes()[: end - 1])
    with pytest.raises(GGUFError, match=rf"'q80\.weight'.*{last.offset}\.\.{end}, file has {end - 1}"):
        read_gguf(path)
    path.write_bytes(sample.read_bytes()[:end])  # only trailing padding removed: still a valid file
    assert read_gguf(path).tensors["q80.weight"].nbytes == last.nbytes


@pytest.mark.parametrize(("ggml_type", "block", "block_bytes"), [("Q5_0", 32, 22), ("Q4_K", 256, 144), ("BF16", 1, 2)])
def test_unsupported_tensor_type(tmp_path: Path, ggml_type: str, block: int, block_bytes: int) -> None:
    raw = np.zeros((2, 256 // block * block_bytes), np.uint8)
    tensors = {"ok.weight": ("F32", np.ones(4)), "odd.weight": (ggml_type, raw)}
    path = write_gguf(tmp_path / "odd.gguf", "llama", {}, tensors)
    with pytest.raises(UnsupportedTensorTypeError, match=rf"'odd\.weight'.*{ggml_type}"):
        read_gguf(path)


def test_unknown_tensor_type_id(tmp_path: Path, sample: Path) -> None:
    dims_at = _tensor_info_offset(sample, "norm.weight")
    path = _patched(tmp_path, sample, dims_at + 4 + 8, "<I", 250)  # 1-D: n_dims, ne0, then the type id
    with pytest.raises(UnsupportedTensorTypeError, match=r"'norm\.weight'.*type id 250"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", {}, {"w": ("Q4_K", np.zeros((1, 144), np.uint8))})
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba' is not supported.*llama, qwen2"):
        read_gguf(path, architectures=("qwen2", "llama"))  # checked before the tensor types
    with pytest.raises(UnsupportedTensorTypeError):
        read_gguf(path)


def test_missing_architecture_key_is_unsupported(tmp_path: Path, sample: Path) -> None:
    raw = sample.read_bytes().replace(b"general.architecture", b"general.architecturX")
    path = tmp_path / "noarch.gguf"
    path.write_bytes(raw)
    with pytest.raises(UnsupportedArchitectureError, match=r"no 'general\.architecture' key"):
        read_gguf(path, architectures=("llama",))
    with pytest.raises(GGUFError, match=r"general\.architecture' is missing"):
        _ = read_gguf(path).architecture


def test_dimension_overrunning_the_file(tmp_path: Path, sample: Path) -> None:
    dims_at = _tensor_info_offset(sample, "q80.weight")  # the last tensor: (2, 32) stored as ne = (32, 2)
    path = _patched(tmp_path, sample, dims_at + 4 + 8, "<Q", 1000)
    with pytest.raises(GGUFError, match=r"'q80\.weight'.*shape \(1000, 32\).*file has") as err:
        read_gguf(path)
    assert type(err.value) is GGUFError


def test_dimension_overlapping_the_next_tensor(tmp_path: Path, sample: Path) -> None:
    dims_at = _tensor_info_offset(sample, "proj.weight")  # (3, 5) stored as ne = (5, 3)
    path = _patched(tmp_path, sample, dims_at + 4 + 8, "<Q", 20)
    with pytest.raises(GGUFError, match=r"'proj\.weight'.*overlaps tensor 'half\.weight'"):
        read_gguf(path)


def test_quantized_columns_not_a_multiple_of_32(tmp_path: Path, sample: Path) -> None:
    dims_at = _tensor_info_offset(sample, "q41.weight")
    path = _patched(tmp_path, sample, dims_at + 4, "<Q", 48)
    with pytest.raises(GGUFError, match=r"'q41\.weight' .*Q4_1 has 48 columns, not a multiple of 32"):
        read_gguf(path)


@pytest.mark.parametrize("n_dims", [0, 5])
def test_dimension_count_out_of_range(tmp_path: Path, n_dims: int) -> None:
    # Zero data keeps whatever the shifted parse reads as type and offset at F32, offset 0.
    path = write_gguf(tmp_path / "v.gguf", "llama", {}, {"v.weight": ("F32", np.zeros(64))})
    patched = _patched(tmp_path, path, _tensor_info_offset(path, "v.weight"), "<I", n_dims)
    with pytest.raises(GGUFError, match=rf"'v\.weight'.* has {n_dims} dimensions; GGUF allows 1 to 4"):
        read_gguf(patched)


def test_empty_dimension(tmp_path: Path, sample: Path) -> None:
    dims_at = _tensor_info_offset(sample, "norm.weight")
    with pytest.raises(GGUFError, match=r"'norm\.weight'.*empty dimension"):
        read_gguf(_patched(tmp_path, sample, dims_at + 4, "<Q", 0))


def test_misaligned_tensor_offset(tmp_path: Path, sample: Path) -> None:
    dims_at = _tensor_info_offset(sample, "half.weight")  # 2-D: n_dims, ne0, ne1, type, offset
    offset_at = dims_at + 4 + 16 + 4
    (rel,) = struct.unpack_from("<Q", sample.read_bytes(), offset_at)
    with pytest.raises(GGUFError, match=rf"'half\.weight'.*offset {rel + 2} is not a multiple of 32"):
        read_gguf(_patched(tmp_path, sample, offset_at, "<Q", rel + 2))


def test_corrupt_array_length_fails_fast(tmp_path: Path, sample: Path) -> None:
    raw = sample.read_bytes()
    key = b"tokenizer.ggml.token_type"
    length_at = raw.index(key) + len(key) + 4 + 4  # value type ARRAY, item type INT32, then the u64 length
    assert struct.unpack_from("<Q", raw, length_at) == (4,)
    path = _patched(tmp_path, sample, length_at, "<Q", 2**62)
    t0 = time.perf_counter()
    with pytest.raises(GGUFError, match=rf"array at offset \d+ declares {2**62} items"):
        read_gguf(path)
    assert time.perf_counter() - t0 < 1.0


def test_undecodable_string_is_gguf_error(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "s.gguf", "llama", {"test.text": "abcd"}, {})
    raw = path.read_bytes().replace(b"abcd", b"ab\xff\xfe")
    path.write_bytes(raw)
    with pytest.raises(GGUFError, match=r"test\.text"):
        read_gguf(path)


_scalars = st.one_of(
    st.text(max_size=12),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(width=32, allow_nan=False),
)
_arrays = st.one_of(
    st.lists(st.text(max_size=6), min_size=1, max_size=6),
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=6),
    st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=6),
    st.lists(st.booleans(), min_size=1, max_size=6),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.from_regex(r"test\.[a-z_]{1,10}", fullmatch=True), st.one_of(_scalars, _arrays), max_size=6))
def test_metadata_round_trip_property(tmp_path: Path, metadata: dict) -> None:
    path = write_gguf(tmp_path / f"m-{next(_SEQ)}.gguf", "llama", metadata, {})
    f = read_gguf(path)
    assert {k: v for k, v in f.metadata.items() if k.startswith("test.")} == metadata
    assert f.tensors == {}


@pytest.mark.parametrize(
    ("metadata", "tensors", "match"),
    [
        ({"x": []}, {}, "empty array"),
        ({"x": [1, "a"]}, {}, "array items"),
        ({"x": 2**64}, {}, "64-bit"),
        ({"x": {"a": 1}}, {}, "cannot store a dict"),
        ({"general.architecture": "qwen2"}, {}, "arch is 'llama'"),
        ({}, {"w": ("Q9_9", np.zeros((1, 18), np.uint8))}, "unknown GGML type"),
        ({}, {"w": ("Q4_0", np.zeros((1, 18), np.int8))}, "raw uint8"),
        ({}, {"w": ("Q4_0", np.zeros((1, 20), np.uint8))}, r"'w' \(Q4_0"),
    ],
)
def test_writer_rejects_bad_input(tmp_path: Path, metadata: dict, tensors: dict, match: str) -> None:
    with pytest.raises(GGUFError, match=match):
        write_gguf(tmp_path / "w.gguf", "llama", metadata, tensors)


def test_writer_honours_alignment(tmp_path: Path) -> None:
    tensors = {"a": ("F32", np.arange(3, dtype=np.float32)), "b": ("F32", np.arange(5, dtype=np.float32))}
    f = read_gguf(write_gguf(tmp_path / "a.gguf", "llama", {"general.alignment": 64}, tensors))
    assert f.metadata["general.alignment"] == 64
    assert all(t.offset % 64 == 0 for t in f.tensors.values())
    np.testing.assert_array_equal(f.tensors["b"].data, np.arange(5))
