"""Model specs ("demo", a CLIP name such as "RN50", or a checkpoint path) and where they live."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from clipsearch.errors import ClipsearchError, ModelUnavailable

DATA_DIR = Path(__file__).parent / "demo" / "data"
DEMO_CHECKPOINT = DATA_DIR / "demo.pt"
DEMO = "demo"
DEMO_DIM = 128  # the bundled demo's output dimension (tests/unit/test_download.py checks it against the file)
# The model of a new local index when no --model is given (CONTRACT §1); an existing index keeps its own.
DEFAULT = "ViT-B/32"
# Replaces the scheme, host and path before "<sha256>/<file>" of clip-anytorch's download URLs (a mirror,
# or a local server in tests).
URL_ENV = "CLIPSEARCH_MODEL_URL"
CACHE_ENV = "CLIPSEARCH_MODEL_CACHE"
CHUNK = 64 * 1024  # bytes per read: the progress bar moves at least every 64 KiB
DOWNLOAD_TIMEOUT_S = 30  # per connect and per read: an unreachable host fails instead of hanging

# Output dimensions of the clip-anytorch models, so a dimension is known without loading weights.
KNOWN_DIMS = {
    "RN50": 1024,
    "RN101": 512,
    "RN50x4": 640,
    "RN50x16": 768,
    "RN50x64": 1024,
    "ViT-B/32": 512,
    "ViT-B/16": 512,
    "ViT-L/14": 768,
    "ViT-L/14@336px": 768,
}


@dataclass(frozen=True)
class ModelSource:
    """What model_code's load_model() needs: a directory and a name inside it (or a spec)."""

    spec: str
    model_dir: str
    name: str


def canonical_spec(spec: str) -> str:
    """The string recorded in an index: `demo`, a CLIP name, or an absolute checkpoint path."""
    if spec == DEMO or spec in KNOWN_DIMS:
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def resolve(spec: str) -> ModelSource:
    """Map a spec onto a model_dir/name pair for model_code.load_model()."""
    spec = canonical_spec(spec)
    if spec == DEMO:
        return ModelSource(spec, str(DATA_DIR), DEMO_CHECKPOINT.name)
    if spec in KNOWN_DIMS:
        return ModelSource(spec, str(cache_dir()), spec)
    path = Path(spec)
    return ModelSource(spec, str(path.parent), path.name)


def cache_dir() -> Path:
    """Where CLIP names are cached: $CLIPSEARCH_MODEL_CACHE, else clip-anytorch's own ~/.cache/clip."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clip").expanduser()


class DownloadCorrupt(ClipsearchError):
    """A downloaded checkpoint's SHA-256 differs from the one in its URL; the file was deleted (exit 1)."""

    code = "model_download_corrupt"


class DownloadProgress(Protocol):
    """What a download reports; the CLI draws it on stderr."""

    def note(self, line: str) -> None:
        """One line: waiting for another download, or which file is being fetched."""

    def advance(self, done: int, total: int | None) -> None:
        """Bytes received so far, and the expected total when the server said it."""

    def finish(self) -> None:
        """The transfer ended (well or not)."""


def checkpoint_url(name: str) -> str:
    """clip-anytorch's URL for a CLIP name, its second-to-last component being the file's SHA-256."""
    from model_code.inference import _import_clip

    url: str = _import_clip().clip._MODELS[name]
    base = os.environ.get(URL_ENV)
    if base:
        url = base.rstrip("/") + "/" + "/".join(url.split("/")[-2:])
    return url


def cached_path(name: str) -> Path:
    """Where a CLIP name's checkpoint lives once downloaded (clip-anytorch's file name: ViT-B-32.pt)."""
    return cache_dir() / checkpoint_url(name).rsplit("/", 1)[-1]


def unavailable_message(spec: str, reason: str) -> str:
    """The one line for a model that is neither cached nor downloadable, naming the ways forward."""
    return (
        f"model {spec} is not cached and cannot be downloaded ({reason}); connect to the internet once "
        f"to download it, or use --model demo to try the bundled demo, or "
        f"--model /path/to/{spec.replace('/', '-')}.pt"
    )


def ensure(spec: str, progress: DownloadProgress | None = None) -> ModelSource:
    """resolve(), and for a CLIP name make sure its verified checkpoint is cached (downloading it once)."""
    source = resolve(spec)
    if source.spec not in KNOWN_DIMS:
        return source
    try:
        path = fetch(checkpoint_url(source.spec), cache_dir(), progress)
    except OSError as e:  # urllib's errors are OSErrors: offline, DNS, refused, timed out, HTTP 4xx/5xx
        raise ModelUnavailable(unavailable_message(source.spec, _reason(e))) from None
    except http.client.HTTPException as e:  # a malformed or cut-off answer (IncompleteRead of a chunked body)
        raise ModelUnavailable(unavailable_message(source.spec, e.__class__.__name__)) from None
    return ModelSource(source.spec, str(path.parent), path.name)


def _reason(e: OSError) -> str:
    reason = getattr(e, "reason", None) or e.strerror or e.__class__.__name__
    if isinstance(reason, OSError):  # URLError wraps the socket's error: keep its words, not its errno
        reason = reason.strerror or reason.__class__.__name__
    return " ".join(str(reason).split())


def fetch(url: str, root: Path, progress: DownloadProgress | None = None) -> Path:
    """The file behind url in root, downloaded once and checked against the SHA-256 in its URL.

    Safe for concurrent processes: one downloads under <root>/<file>.lock to a temporary file in root,
    checks it and renames it into place; the others wait, then find the finished file.
    """
    expected = url.rsplit("/", 2)[-2].lower()
    target = root / url.rsplit("/", 1)[-1]
    if _verified(target, expected):  # the usual case: no lock file, no write
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / (target.name + ".lock"), target.name, progress):
        if _verified(target, expected):
            return target  # another process finished it while this one waited
        target.unlink(missing_ok=True)  # a damaged copy (an old interrupted download): fetch it again
        _download(url, target, expected, progress)
        _stamp(target, expected)
    return target


def _verified(target: Path, expected: str) -> bool:
    """True when target holds the file whose SHA-256 is expected.

    A checkpoint is hundreds of MB (about 0.3 s to hash warm, seconds cold), so a verified file gets a
    stamp beside it (<file>.verified: hash, size, mtime) and is hashed again only when those change.
    """
    try:
        st = target.stat()
    except OSError:
        return False
    stamp = f"{expected} {st.st_size} {st.st_mtime_ns}"
    try:
        if _stamp_path(target).read_text() == stamp:
            return True
    except OSError:
        pass
    if _sha256(target) != expected:
        return False
    _stamp(target, expected)
    return True


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _stamp(target: Path, expected: str) -> None:
    try:
        st = target.stat()
        _stamp_path(target).write_text(f"{expected} {st.st_size} {st.st_mtime_ns}")
    except OSError:
        pass  # a read-only cache: the file is hashed on every start, as before


@contextlib.contextmanager
def _locked(path: Path, name: str, progress: DownloadProgress | None) -> Iterator[None]:
    with open(path, "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress.note(f"waiting for another process downloading {name}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # the lock file stays: unlinking it would let a third process lock a different inode


def _download(url: str, target: Path, expected: str, progress: DownloadProgress | None) -> None:
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as source:
            length = source.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if progress:
                size = f" ({total / 1e6:.1f} MB)" if total else ""
                progress.note(f"downloading {target.name}{size} to {target.parent} (once)")
            done = 0
            try:
                while chunk := source.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress.advance(done, total)
            finally:
                if progress:
                    progress.finish()
        if digest.hexdigest() != expected:
            raise DownloadCorrupt(
                f"the downloaded file {target.name} was corrupt (SHA-256 mismatch) and has been deleted; run again"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def listing() -> list[dict[str, Any]]:
    """Every spec `--model` takes by name, its dimension, and whether (and where) it is cached."""
    rows: list[dict[str, Any]] = [
        {"spec": DEMO, "dim": DEMO_DIM, "cached": True, "path": str(DEMO_CHECKPOINT), "default": False}
    ]
    from model_code.inference import _import_clip

    for name in _import_clip().available_models():
        path = cached_path(name)
        rows.append(
            {
                "spec": name,
                "dim": KNOWN_DIMS.get(name),
                "cached": path.is_file(),
                "path": str(path),
                "default": name == DEFAULT,
            }
        )
    return rows


# clip.model.CLIP constructor arguments of the real architectures, for benchmarks and parity tests
# with random weights (compute does not depend on the weight values).
ARCHITECTURES: dict[str, tuple] = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
}


def random_model(arch: str, seed: int = 0) -> Any:
    """A randomly initialised real CLIP architecture wrapped for model_code (no download needed)."""
    import clip
    import torch
    from clip.model import CLIP

    from model_code.inference import prepare_model

    torch.manual_seed(seed)
    model = CLIP(*ARCHITECTURES[arch])
    return prepare_model(arch, model, clip.clip._transform(model.visual.input_resolution))
