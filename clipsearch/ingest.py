"""Local ingest: walk folders, skip what is unchanged, decode in threads, encode in batches, upsert.

Each batch is committed on its own, so an interrupted run keeps what it finished and a re-run
picks up the rest (unchanged files are recognised by size and mtime).

The walk takes folders as they really are: it never follows a symbolic link to a folder (so no link
loop can trap it), never opens anything but a regular file, reads a file only after its size and its
first bytes say it is a picture of sane size, and reports each folder it cannot list, whose indexed
pictures are then kept rather than treated as deleted. Keys are absolute paths in the OS's own
spelling: a name that is not valid UTF-8 stays surrogate-escaped (`os.fsdecode`), so it names the
same file when it is opened again.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from PIL import Image

from clipsearch.encoders import Encoder
from clipsearch.errors import BadImage, BadRequest, ConfigError
from clipsearch.images import is_image_name
from clipsearch.index.base import Document, Redatable, Rehashable, VectorIndex, doc_id, wall_clock
from clipsearch.perceptual import perceptual_hash
from model_code.inference import decode_for_model, read_capture_time

# The largest file read whole. An uncompressed 100 MP picture (the pixel limit) in 8-bit RGBA is
# 400 MB; nothing larger can be a picture the decoder accepts, and reading it costs its size in memory.
MAX_FILE_BYTES = 512 * 1024 * 1024
# How a file starts when it is one of the formats the decoder reads; anything else is not read further.
_SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
    # Camera RAW that is not TIFF inside (DNG, CR2, NEF, ARW... are): Olympus ORF, Panasonic RW2,
    # Fujifilm RAF, Sigma X3F, Minolta MRW.
    b"IIRO",
    b"IIRS",
    b"MMOR",
    b"IIU\x00",
    b"FUJIFILM",
    b"FOVb",
    b"\x00MRM",
)
# ISO base media (HEIF, AVIF) brands: pictures, unlike the video brands of an .mp4 renamed .jpg.
_PICTURE_BRANDS = {
    b"heic",
    b"heix",
    b"hevc",
    b"hevx",
    b"heim",
    b"heis",
    b"mif1",
    b"msf1",
    b"avif",
    b"avis",
    b"crx ",
}  # crx: Canon CR3
# Picture formats the decoder does not read: passed over in a walk, and counted by format.
_OTHER_PICTURE_EXTENSIONS = frozenset({".svg", ".jxl", ".psd", ".ico", ".jp2"})
LOCK_NAME = "indexer.lock"
_SURROGATES = re.compile("[\udc80-\udcff]")


@dataclass
class IngestSummary:
    """Counts for one run.

    skipped: (path, reason) of each file that looked like a picture but was not indexed; ignored:
    reason -> count of entries passed over in the walk; unlisted: (folder, reason) of each folder
    that could not be listed, and kept: how many indexed pictures below those folders were kept.
    """

    seen: int = 0
    indexed: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)
    unlisted: list[tuple[str, str]] = field(default_factory=list)
    kept: int = 0
    seconds: float = 0.0
    dated: int = 0  # unchanged pictures given the capture time they were indexed without
    mtime_dated: int = 0  # pictures indexed in this run without an EXIF capture date: dated by their mtime
    hashed: int = 0  # unchanged pictures given the perceptual hash they were indexed without

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Loaded:
    path: Path
    image: Image.Image | None
    data_hash: str = ""
    width: int = 0
    height: int = 0
    size: int = 0
    mtime: float = 0.0
    error: str = ""
    taken_at: str | None = None
    taken_offset: str = ""
    mtime_dated: bool = False
    phash: str | None = None


@dataclass
class Walk:
    """What a walk found: candidate pictures (by key path) and everything it could not take."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)
    unlisted: list[tuple[str, str]] = field(default_factory=list)


def _reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symbolic link loop"
    if e.errno == errno.ENAMETOOLONG:
        return "path too long for the system"
    return e.strerror or str(e)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _name_reason(name: str) -> str:
    """Why a walk passes over a regular file by its name."""
    suffix = Path(name).suffix.lower()
    if suffix in _OTHER_PICTURE_EXTENSIONS:
        return f"{suffix[1:].upper()} pictures (format not supported)"
    return "not a picture (by name)"


def walk(roots: Iterable[Path]) -> Walk:
    """Candidate pictures under the given folders (recursively, in a stable order) and every file named.

    A file named on its own is always tried, so one that is not an image (an SVG, a PSD) is reported
    as skipped with its reason instead of being passed over in silence. Roots are absolute paths.
    """
    found = Walk()
    for root in roots:
        try:
            st = os.stat(root)
        except OSError as e:
            found.skipped.append((str(root), "broken symbolic link" if e.errno == errno.ENOENT else _reason(e)))
            continue
        if not stat.S_ISDIR(st.st_mode):
            if stat.S_ISREG(st.st_mode):
                found.files.append(root)
            else:
                found.skipped.append((str(root), f"not a regular file ({_kind(st.st_mode)})"))
            continue
        _walk_folder(root, (st.st_dev, st.st_ino), found)
    return found


def _walk_folder(root: Path, identity: tuple[int, int], found: Walk) -> None:
    visited = {identity}
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            found.unlisted.append((folder, _reason(e)))
            continue
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError as e:  # a folder too deep for the system's path limit
                        found.unlisted.append((entry.path, _reason(e)))
                        continue
                    if (st.st_dev, st.st_ino) in visited:  # a bind mount of a folder inside itself
                        found.ignored["folder seen before (a mount loop)"] += 1
                    else:
                        visited.add((st.st_dev, st.st_ino))
                        subfolders.append(entry.path)
                    continue
                _classify(entry, found)
            except OSError as e:
                if is_image_name(entry.name):
                    found.skipped.append((entry.path, _reason(e)))
                else:
                    found.ignored[_reason(e)] += 1
        stack.extend(reversed(subfolders))  # depth first, in name order


def _classify(entry: os.DirEntry[str], found: Walk) -> None:
    """One entry that is not a real folder: a candidate, a named skip, or an ignored one counted."""
    picture = is_image_name(entry.name)
    if entry.is_symlink():
        try:
            st = os.stat(entry.path)
        except OSError as e:
            reason = "broken symbolic link" if e.errno == errno.ENOENT else _reason(e)
            if picture:
                found.skipped.append((entry.path, reason))
            else:
                found.ignored[reason] += 1
            return
        if stat.S_ISDIR(st.st_mode):
            found.ignored["symbolic link to a folder (not followed)"] += 1
            return
        mode = st.st_mode
    else:
        mode = entry.stat(follow_symlinks=False).st_mode if not entry.is_file(follow_symlinks=False) else stat.S_IFREG
    if not stat.S_ISREG(mode):
        if picture:
            found.skipped.append((entry.path, f"not a regular file ({_kind(mode)})"))
        else:
            found.ignored["not a regular file"] += 1
    elif picture:
        found.files.append(Path(entry.path))
    else:
        found.ignored[_name_reason(entry.name)] += 1


def scan(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Candidate pictures under the given folders and every regular file named (see walk())."""
    yield from walk([key_path(p) for p in paths]).files


def key_path(path: str | Path) -> Path:
    """The absolute path a file or folder is indexed under: its folder resolved, its own name kept.

    A folder is resolved through its links; a file keeps its own name, so a symbolic link to a picture
    is indexed as the link (where the user put it), not as its target. Never follows a link loop.
    """
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if p.parent == p:
        return p
    if os.path.isdir(p):
        return Path(os.path.realpath(p))
    return Path(os.path.realpath(p.parent)) / p.name


def title_from_path(path: Path) -> str:
    """A readable title from a file name: `2019_pool-party.jpg` -> `2019 pool party`."""
    return _SURROGATES.sub("\ufffd", re.sub(r"[_\-.]+", " ", path.stem).strip())


def has_picture_signature(head: bytes) -> bool:
    """Whether the first bytes of a file are those of a picture format (the decoder decides the rest)."""
    if head.startswith(_SIGNATURES):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head[4:8] == b"ftyp" and head[8:12] in _PICTURE_BRANDS


def read_picture_file(
    path: str | Path, limit: int = MAX_FILE_BYTES, head: int | None = None
) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file that starts like a picture and is at most `limit` bytes; BadImage if not.

    Nothing but a regular file is opened (a FIFO would block, a device would never end), and a file
    that does not start with a picture signature is never read beyond its first bytes. `head`: read only
    that many leading bytes (a header is all that is wanted).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise BadImage(f"cannot read: {_reason(e)}") from None
    _check_file(st, limit)
    try:
        # O_NONBLOCK: belt and braces, should the file be swapped for a FIFO after the check above.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise BadImage(f"cannot read: {_reason(e)}") from None
    try:
        st = os.fstat(fd)
        _check_file(st, limit)
        if not has_picture_signature(os.pread(fd, 16, 0)):
            raise BadImage("not a recognised image format")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(head if head is not None else limit + 1)
    except OSError as e:
        raise BadImage(f"cannot read: {_reason(e)}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BadImage(f"file too large (over {limit // (1024 * 1024)} MB)")
    return data, st


def _check_file(st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise BadImage(f"not a regular file ({_kind(st.st_mode)})")
    if st.st_size == 0:
        raise BadImage("empty image")
    if st.st_size > limit:
        raise BadImage(
            f"file too large ({st.st_size / (1024 * 1024):,.0f} MB; the limit is {limit // (1024 * 1024)} MB)"
        )


def _load(path: Path) -> _Loaded:
    try:
        data, st = read_picture_file(path)
        try:
            decoded = decode_for_model(data, name=path.name)  # the name tells a camera RAW file
        except ValueError as e:
            raise BadImage(str(e)) from None
    except BadImage as e:
        return _Loaded(path, None, error=str(e))
    # Capture time (CONTRACT §7): EXIF DateTimeOriginal, else the file's mtime as local wall-clock time.
    return _Loaded(
        path,
        decoded.image,
        hashlib.sha256(data).hexdigest(),
        decoded.width,
        decoded.height,
        st.st_size,
        st.st_mtime,
        taken_at=decoded.taken_at or wall_clock(st.st_mtime),
        taken_offset=decoded.taken_offset,
        mtime_dated=decoded.taken_at is None,
        phash=perceptual_hash(decoded.image),
    )


EXIF_HEAD_BYTES = 256 * 1024


def capture_time_of(path: Path) -> tuple[str, str] | None:
    """(taken_at, taken_offset) of a file from its EXIF header (no pixel decoded), else its mtime; None:
    unreadable. For rows indexed before capture times were kept, whose vectors need no re-encoding."""
    try:
        # A JPEG's EXIF sits in its first segments (APP1 is at most 64 KB), so a migrated library of
        # camera JPEGs is re-dated without reading whole files; other formats may keep it anywhere.
        data, st = read_picture_file(path, head=EXIF_HEAD_BYTES)
        if not data.startswith(b"\xff\xd8") and st.st_size > len(data):
            data, st = read_picture_file(path)
    except BadImage:
        return None
    taken_at, offset = read_capture_time(data)
    return (taken_at, offset) if taken_at else (wall_clock(st.st_mtime), "")


def _fill_capture_times(index: VectorIndex, roots: list[Path], unchanged: list[Path], pool: ThreadPoolExecutor) -> int:
    """Give unchanged files indexed without a capture time (an index migrated from schema 1) theirs."""
    if not unchanged or not isinstance(index, Redatable):
        return 0
    return _fill_in(roots, unchanged, pool, index.undated, capture_time_of, index.set_taken)


_T = TypeVar("_T")


def _fill_in(
    roots: list[Path],
    unchanged: list[Path],
    pool: ThreadPoolExecutor,
    missing: Callable[[str], set[str]],
    read: Callable[[Path], _T | None],
    write: Callable[[dict[str, _T]], int],
) -> int:
    """For the unchanged files whose keys missing(prefix) lists, read(path) in the pool and write(key -> value)."""
    lacking: set[str] = set()
    for root in roots:
        lacking |= missing(str(root).rstrip(os.sep) + os.sep if os.path.isdir(root) else str(root))
    todo = [p for p in unchanged if str(p) in lacking]
    filled = 0
    for start in range(0, len(todo), 256):
        batch = todo[start : start + 256]
        found = {str(p): v for p, v in zip(batch, pool.map(read, batch), strict=True) if v is not None}
        filled += write(found)
    return filled


def hashes_of(path: Path) -> tuple[str, str] | None:
    """(sha256, perceptual hash) of a file: read and decoded again, never encoded; None: unreadable now."""
    try:
        data, _ = read_picture_file(path)
        decoded = decode_for_model(data, name=path.name)
    except (BadImage, ValueError):
        return None
    return hashlib.sha256(data).hexdigest(), perceptual_hash(decoded.image)


def _fill_hashes(index: VectorIndex, roots: list[Path], unchanged: list[Path], pool: ThreadPoolExecutor) -> int:
    """Give unchanged files indexed without a perceptual hash (an index migrated from schema 1 or 2) theirs."""
    if not unchanged or not isinstance(index, Rehashable):
        return 0
    return _fill_in(roots, unchanged, pool, index.unhashed, hashes_of, index.set_hashes)


@runtime_checkable
class _ListsUnusable(Protocol):
    """An index that keeps rows it cannot search (an unusable vector) out of fingerprints() but can name them."""

    def unusable_keys(self, prefix: str = "") -> set[str]: ...


def _indexed_keys(index: VectorIndex, prefix: str) -> dict[str, tuple[int, float] | None]:
    """key -> fingerprint of the entries starting with prefix; None for a row with an unusable vector,
    which matches no file (so `index` re-embeds it) yet can still be deleted."""
    keys: dict[str, tuple[int, float] | None] = dict(index.fingerprints(prefix))
    if isinstance(index, _ListsUnusable):
        keys.update((k, None) for k in index.unusable_keys(prefix) if k not in keys)
    return keys


# How many files named on their own are looked up one by one; more are found in one scan.
_ONE_SCAN_FROM = 16


def _under(key: str, folder: str) -> bool:
    """Whether key is folder or below it, by whole path components."""
    return key == folder or key.startswith(folder if folder.endswith(os.sep) else folder + os.sep)


def index_paths(
    paths: list[str | Path],
    encoder: Encoder,
    index: VectorIndex,
    batch_size: int = 32,
    workers: int = 2,
    on_skip: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    on_unlisted: Callable[[str, str], None] | None = None,
) -> IngestSummary:
    """Index every image under paths; remove indexed files under those folders that are gone.

    Pictures below a folder that could not be listed are kept (on_unlisted names each such folder).
    """
    started = time.perf_counter()
    summary = IngestSummary()

    def skip(path: str, reason: str) -> None:
        summary.skipped.append((path, reason))
        if on_skip:
            on_skip(path, reason)

    roots = []
    for p in paths:
        root = key_path(p)
        if not os.path.lexists(root):
            raise BadRequest(f"no such file or folder: {root}")
        roots.append(root)
    found = walk(roots)
    for folder, reason in found.unlisted:
        summary.unlisted.append((folder, reason))
        if on_unlisted:
            on_unlisted(folder, reason)
    for named, reason in found.skipped:
        skip(named, reason)
    summary.ignored = found.ignored
    files = found.files
    summary.seen = len(files) + len(found.skipped)
    known: dict[str, tuple[int, float] | None] = {}
    given = {str(root) for root in roots if not os.path.isdir(root)}
    for root in roots:
        if os.path.isdir(root):
            known.update(_indexed_keys(index, str(root).rstrip(os.sep) + os.sep))
    if len(given) > _ONE_SCAN_FROM:
        # Many files named one by one (a reindex names every file of the index): one scan of the folder they
        # share, not a lookup each (on OpenSearch, a search request per file).
        shared = os.path.commonpath(sorted(given))
        known.update((k, v) for k, v in _indexed_keys(index, shared).items() if k in given)
    else:  # a prefix match would also take in `a.jpg.png` beside `a.jpg`
        for key in given:
            known.update((k, v) for k, v in _indexed_keys(index, key).items() if k == key)
    todo: list[Path] = []
    unchanged: list[Path] = []
    for path in files:
        fp = known.get(str(path))
        try:
            st = path.stat()
        except OSError as e:
            skip(str(path), f"cannot read: {_reason(e)}")
            continue
        if fp is not None and fp[0] == st.st_size and fp[1] == st.st_mtime:
            summary.unchanged += 1
            unchanged.append(path)
        else:
            todo.append(path)
    # Skipped files and whatever lies below an unlisted folder still exist: only what is gone is dropped.
    present = {str(p) for p in files} | {p for p, _ in found.skipped}
    gone = []
    for key in known:
        if key in present:
            continue
        if any(_under(key, folder) for folder, _ in found.unlisted):
            summary.kept += 1
        else:
            gone.append(key)
    if gone:
        summary.deleted = index.delete([doc_id("", key) for key in gone])
    if on_plan:
        on_plan(len(todo))

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        summary.dated = _fill_capture_times(index, roots, unchanged, pool)
        summary.hashed = _fill_hashes(index, roots, unchanged, pool)
        _encode_all(todo, pool, encoder, index, batch_size, summary, skip, on_progress)
    except BaseException:
        # Ctrl-C: stop now. Waiting for the workers would hang on one stuck in a read (a network share).
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    summary.seconds = time.perf_counter() - started
    return summary


def _encode_all(
    todo: list[Path],
    pool: ThreadPoolExecutor,
    encoder: Encoder,
    index: VectorIndex,
    batch_size: int,
    summary: IngestSummary,
    skip: Callable[[str, str], None],
    on_progress: Callable[[int], None] | None,
) -> None:
    # Decoding runs ahead of the encoder by two batches, so IO and decode overlap the forward.
    pending: list[Future[_Loaded]] = []
    it = iter(todo)
    lookahead = batch_size * 2
    for path in it:
        pending.append(pool.submit(_load, path))
        if len(pending) >= lookahead:
            break
    while pending:
        batch_futures, pending = pending[:batch_size], pending[batch_size:]
        for path in it:
            pending.append(pool.submit(_load, path))
            if len(pending) >= lookahead:
                break
        loaded = [f.result() for f in batch_futures]
        good = [item for item in loaded if item.image is not None]
        for item in loaded:
            if item.image is None:
                skip(str(item.path), item.error)
        if good:
            vectors = encoder.encode_images([item.image for item in good if item.image is not None])
            docs = [
                Document(
                    key=str(item.path),
                    vector=vec,
                    title=title_from_path(item.path),
                    content_hash=item.data_hash,
                    size=item.size,
                    mtime=item.mtime,
                    width=item.width,
                    height=item.height,
                    taken_at=item.taken_at,
                    taken_offset=item.taken_offset,
                    phash=item.phash,
                )
                for item, vec in zip(good, vectors, strict=True)
            ]
            result = index.upsert(docs)
            summary.indexed += result.written
            summary.mtime_dated += sum(
                1 for item, doc in zip(good, docs, strict=True) if item.mtime_dated and doc.id not in result.failed
            )
            for id_, reason in result.failed.items():
                skip(id_, reason)
        if on_progress:
            on_progress(len(loaded))


def forget_key(path: str | Path) -> list[str]:
    """The keys a path may be indexed under, whether or not it still exists: as given and resolved."""
    given = os.path.abspath(os.path.expanduser(os.fspath(path)))
    return sorted({given, str(key_path(given))})


def forget(index: VectorIndex, path: str | Path) -> int:
    """Remove the entries at or below path, matching whole path components; returns how many."""
    keys: set[str] = set()
    for target in forget_key(path):
        keys.update(k for k in _indexed_keys(index, target) if _under(k, target))
    return index.delete([doc_id("", k) for k in sorted(keys)]) if keys else 0


@contextmanager
def writer_lock(directory: str | Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the index's writer lock for one run: a second indexer of the same index waits for the first.

    An flock on `indexer.lock` in the index folder; the kernel releases it when the holder exits, even
    on kill -9, so a stale lock file never blocks anyone.
    """
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # flock works on a read-only descriptor too
        except OSError as e:
            raise ConfigError(f"cannot open the index's lock file {path}: {_reason(e)}") from None
    except OSError as e:
        raise ConfigError(f"cannot create the index's lock file {path}: {_reason(e)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            if on_wait:
                who = f" (pid {holder})" if holder.isdigit() else ""
                on_wait(
                    f"another clipsearch run{who} is writing to the index {directory}; waiting for it "
                    "to finish (Ctrl-C to stop)"
                )
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # read-only descriptor: the pid is only for the waiting message
        yield
    finally:
        os.close(fd)
