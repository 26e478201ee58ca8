"""Physical indexes behind one index name, so a model migration (`clipsearch reindex`) needs no downtime.

The name a user gives leads to one physical index built with one model: on OpenSearch an alias over
`NAME-<model slug>-<n>`, on the embedded backend a pointer file `<folder>/current` naming the sub-folder
`index-<model slug>-<n>` that holds the database. A reindex builds the next one beside the current one and
then moves the name over in one atomic step. A folder without a pointer is a plain index and keeps working.

A generation being built holds a marker file `building`, written before its database and removed just before
the pointer first names it: a reindex cut short (Ctrl-C, a crash) is resumed from it, and a generation that
was ever live (it may hold pictures deleted since) never is. A marker on a folder, not a row in the
database, because the switch must clear it without opening a database another process may be writing.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

from clipsearch.errors import ConfigError

__all__ = [
    "POINTER",
    "BUILDING",
    "model_slug",
    "resolve",
    "pointer_target",
    "next_generation",
    "unfinished",
    "begin",
    "switch",
    "generation_number",
]

POINTER = "current"
BUILDING = "building"
_PREFIX = "index-"
_UNSAFE = re.compile(r"[^a-z0-9]+")
# A checkpoint file name keeps this much of its stem; the hash tells two `model.pt` in other folders apart.
_STEM_CHARS = 40


def model_slug(spec: str) -> str:
    """A lower-case, index-safe form of a model spec: "ViT-B/32" -> "vit-b-32", a path -> stem + short hash.

    OpenSearch index names must be lower case and cannot hold `\\ / * ? " < > | space , #` (OpenSearch docs,
    "Index naming restrictions"); the result also makes a portable folder name.
    """
    if Path(spec).is_absolute() or spec.endswith((".pt", ".pth")):  # a checkpoint, not a CLIP name
        stem = _UNSAFE.sub("-", Path(spec).stem.lower()).strip("-")[:_STEM_CHARS] or "checkpoint"
        return f"{stem}-{hashlib.sha1(spec.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    return _UNSAFE.sub("-", spec.lower()).strip("-") or "model"


def generation_number(name: str, base: str, slug: str) -> int | None:
    """n of a physical name `<base>-<slug>-<n>`, else None."""
    prefix = f"{base}-{slug}-"
    rest = name[len(prefix) :]
    return int(rest) if name.startswith(prefix) and rest.isdigit() else None


def pointer_target(directory: Path) -> str | None:
    """The sub-folder name `<directory>/current` holds; None: a plain index (no pointer)."""
    try:
        name = (directory / POINTER).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        # No pointer, or "directory" is not a folder one may read: the open itself then says what is wrong.
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {directory / POINTER}: {getattr(e, 'strerror', None) or e}") from None
    if name and (name != Path(name).name or name in (".", "..")):
        raise ConfigError(f"{directory / POINTER} names {name!r}, not a folder beside it; fix or remove it")
    return name or None


def resolve(directory: Path) -> Path:
    """The folder that holds the database the index folder leads to now: the pointer's, else itself."""
    name = pointer_target(directory)
    return directory / name if name else directory


def _numbered(directory: Path, spec: str) -> dict[int, Path]:
    """n -> folder of every `index-<slug>-<n>` of spec in directory."""
    if not directory.is_dir():
        return {}
    slug = model_slug(spec)
    found = ((generation_number(p.name, _PREFIX.rstrip("-"), slug), p) for p in directory.iterdir())
    return {n: p for n, p in found if n is not None}


def next_generation(directory: Path, spec: str) -> Path:
    """A new, not yet existing sub-folder `index-<slug>-<n>` for an index of spec."""
    slug = model_slug(spec)
    return directory / f"{_PREFIX}{slug}-{max(_numbered(directory, spec), default=0) + 1}"


def unfinished(directory: Path, spec: str) -> Path | None:
    """The newest generation of spec whose build began and was never switched to (it holds the marker)."""
    building = [n for n, p in _numbered(directory, spec).items() if (p / BUILDING).is_file()]
    return directory / f"{_PREFIX}{model_slug(spec)}-{max(building)}" if building else None


def begin(target: Path) -> None:
    """Create the generation folder target with its marker, before anything is written into it."""
    target.mkdir(parents=True)
    (target / BUILDING).touch()
    _sync(target)


def switch(directory: Path, target: Path) -> None:
    """Point the index folder at target atomically: write a temporary file, then os.replace it.

    A reader opens whatever the pointer names at the moment it reads it: the old folder or the new one, never
    half of either. The database itself is never renamed, as SQLite's -wal and -shm files go by its name.
    """
    # The marker goes first: cut short between the two steps, the generation is left as garbage, never
    # resumed; the other way round, a generation once live could be resumed with pictures deleted since.
    (target / BUILDING).unlink(missing_ok=True)
    _sync(target)
    tmp = directory / f".{POINTER}-{os.getpid()}-{secrets.token_hex(4)}"
    # os.open with 0o666: the pointer gets the umask's usual permissions, as the database beside it does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            os.write(fd, (target.name + "\n").encode("utf-8", "surrogateescape"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / POINTER)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync(directory)  # the rename is durable once the folder's entry is on disk


def _sync(directory: Path) -> None:
    """fsync a folder, so a file created, removed or renamed in it stays so after a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
