"""The SQLite layer under real faults: full disk, read-only mount, damaged files, a held lock, half-created
files and a non-finite vector. Each case runs the CLI as a subprocess (demo model) and asserts no traceback,
the exit code, one clear line on stderr, and the index content before and after (nothing lost).

Mounts need root (CI runs as root); those cases skip elsewhere.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clipsearch.demo.catalogue import write_catalogue
from clipsearch.index.base import Document
from clipsearch.index.embedded import DB_NAME, EmbeddedIndex

CLI = [sys.executable, "-m", "clipsearch.cli"]
Content = dict[str, tuple[str, bytes]]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, env=os.environ.copy())


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a failed command (no traceback, nothing else)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("clipsearch: error: "), lines[0]
    return lines[0]


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    return proc.stdout


def content(index_dir: Path) -> Content:
    """id -> (key, vector bytes), read without writing anything: `mode=ro`, or `immutable=1` where SQLite
    cannot create its -shm (a read-only mount, a full disk) and no -wal holds commits."""
    path = os.path.abspath(index_dir / DB_NAME)
    wal = Path(path + "-wal")
    for flag in ("mode=ro", "immutable=1"):
        db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?{flag}", uri=True)
        try:
            return {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, key, vector FROM images")}
        except sqlite3.OperationalError:
            if flag != "mode=ro" or (wal.exists() and wal.stat().st_size):
                raise
        finally:
            db.close()
    raise AssertionError("unreachable")


def assert_same(after: Content, before: Content) -> None:
    """The same documents; re-embedded vectors may differ in the last bits (another batch composition)."""
    assert after.keys() == before.keys()
    for id_, (key, vector) in before.items():
        assert after[id_][0] == key
        np.testing.assert_allclose(
            np.frombuffer(after[id_][1], np.float32), np.frombuffer(vector, np.float32), atol=1e-5
        )


def top_keys(index_dir: Path, text: str = "a red circle", k: int = 5) -> list[str]:
    out = ok(run("search", text, "-k", str(k), "--index", str(index_dir)))
    return [line.split(None, 3)[3] for line in out.splitlines()]  # rank, score, capture time, path


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Content]:
    """A healthy index of 24 demo pictures, its catalogue, and its content."""
    base = tmp_path_factory.mktemp("sqlite-faults")
    catalogue = base / "pictures"
    write_catalogue(catalogue, count=24)
    index_dir = base / "index"
    ok(run("index", str(catalogue), "--index", str(index_dir), "--model", "demo"))
    return index_dir, catalogue, content(index_dir)


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A private copy of the healthy index, as a clean close leaves it: no -wal, no -shm."""
    target = tmp_path / "index"
    target.mkdir()
    shutil.copy2(built[0] / DB_NAME, target / DB_NAME)
    return target


@pytest.fixture
def new_pictures(tmp_path) -> Path:
    folder = tmp_path / "new pictures"
    write_catalogue(folder, count=4)
    return folder


@pytest.fixture
def mount_point(tmp_path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_given_a_full_disk_then_search_works_and_index_fails_with_one_line_and_nothing_lost(
    built, mount_point, new_pictures
):
    index_src, _, before = built
    size = (index_src / DB_NAME).stat().st_size + 256 * 1024
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point))
    index_dir = mount_point / "index"
    index_dir.mkdir()
    shutil.copy2(index_src / DB_NAME, index_dir / DB_NAME)  # closed cleanly: SQLite must create its -shm
    fd = os.open(mount_point / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to the last block
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    assert shutil.disk_usage(mount_point).free == 0

    assert top_keys(index_dir) == top_keys(index_src)
    assert ok(run("stats", "--index", str(index_dir)))
    proc = run("index", str(new_pictures), "--index", str(index_dir), "--model", "demo")
    assert proc.returncode == 1
    assert "full" in error_line(proc)
    assert content(index_dir) == before

    (mount_point / "filler").unlink()
    ok(run("index", str(new_pictures), "--index", str(index_dir), "--model", "demo"))
    after = content(index_dir)
    assert before.items() <= after.items() and len(after) == len(before) + 4


def test_given_a_read_only_mount_then_search_and_check_work_and_index_is_refused(
    built, copy, mount_point, new_pictures
):
    _, _, before = built
    mount("--bind", str(copy), str(mount_point))
    mount("-o", "remount,ro,bind", str(mount_point))
    assert not os.access(mount_point, os.W_OK)

    assert top_keys(mount_point) == top_keys(built[0])
    assert ok(run("check", "--index", str(mount_point))).strip().endswith(f"ok, {len(before)} rows")
    proc = run("index", str(new_pictures), "--index", str(mount_point), "--model", "demo")
    assert proc.returncode == 2
    assert "read-only" in error_line(proc)
    assert content(mount_point) == before


def _damage(path: Path, start: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(range(256)) * (length // 256))


def test_given_a_damaged_copy_then_one_line_names_check_repair_and_repair_then_index_restores_it(built, copy):
    _, catalogue, before = built
    db = copy / DB_NAME
    size = db.stat().st_size
    _damage(db, 4096 * 2, max(4096, (size // 2) // 4096 * 4096))  # pages in the middle, not the header

    proc = run("search", "a red circle", "--index", str(copy))
    assert proc.returncode == 2
    line = error_line(proc)
    assert "damaged" in line and f"clipsearch check --repair --index {copy}" in line

    proc = run("check", "--index", str(copy))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "damaged" in proc.stderr and "--repair" in proc.stderr

    proc = run("check", "--repair", "--index", str(copy))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "repaired" in proc.stdout
    assert list(copy.glob(f"{DB_NAME}.damaged-*")), "the damaged file is kept aside"
    salvaged = content(copy)
    assert salvaged.items() <= before.items()  # what was kept is exactly what was there

    ok(run("check", "--index", str(copy)))
    ok(run("index", "--model", "demo", str(catalogue), "--index", str(copy)))
    assert_same(content(copy), before)


def test_given_a_file_that_is_not_a_database_then_exit_2_names_check_repair_and_index_rebuilds_it(built, copy):
    _, catalogue, before = built
    _damage(copy / DB_NAME, 0, 512)
    for command in (["search", "a red circle"], ["stats"], ["index", str(copy.parent)]):
        proc = run(*command, "--index", str(copy))
        assert proc.returncode == 2, (command, proc.stderr)
        line = error_line(proc)
        assert "damaged" in line and "check --repair" in line

    proc = run("check", "--repair", "--index", str(copy))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # the index must be built again
    assert "model record cannot be read" in proc.stderr and "moved it to" in proc.stderr
    assert list(copy.glob(f"{DB_NAME}.damaged-*")), "the damaged file is kept aside"
    ok(run("index", str(catalogue), "--index", str(copy), "--model", "demo"))
    assert_same(content(copy), before)


@pytest.fixture
def lock_holder(copy) -> Iterator[subprocess.Popen]:
    """Another process holding the index's write lock (BEGIN EXCLUSIVE) until the test ends."""
    code = (
        "import sqlite3, sys\n"
        f"db = sqlite3.connect({str(copy / DB_NAME)!r}, isolation_level=None)\n"
        "db.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    yield holder
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(timeout=30)


def test_given_another_writer_holds_the_lock_then_search_answers_and_index_fails_with_one_line(
    built, copy, lock_holder, new_pictures
):
    _, _, before = built
    assert top_keys(copy) == top_keys(built[0])
    proc = run("index", str(new_pictures), "--index", str(copy), "--model", "demo")
    assert proc.returncode == 1
    assert "locked by another process" in error_line(proc)
    assert content(copy) == before


def _half_created(kind: str, index_dir: Path, healthy: Path) -> None:
    """An index file as a crash while creating it leaves it (the schema is the healthy index's own)."""
    index_dir.mkdir()
    path = index_dir / DB_NAME
    if kind == "zero bytes":
        path.touch()
        return
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    if kind == "schema without model record":
        source = sqlite3.connect(f"file:{urllib.parse.quote(str(healthy / DB_NAME))}?mode=ro", uri=True)
        # FTS5's shadow tables are created by their virtual table's own statement.
        schema = [
            r[0]
            for r in source.execute(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL "
                "AND NOT (type = 'table' AND name LIKE 'images_fts_%')"
            )
        ]
        source.close()
        for statement in schema:
            db.execute(statement)
    db.close()


@pytest.mark.parametrize("kind", ["zero bytes", "header only", "schema without model record"])
def test_given_an_empty_or_half_created_index_then_search_says_so_and_index_builds_it(built, tmp_path, kind):
    _, catalogue, before = built
    index_dir = tmp_path / "index"
    _half_created(kind, index_dir, built[0])

    proc = run("search", "a red circle", "--index", str(index_dir))
    assert proc.returncode == 2
    assert "is empty" in error_line(proc) and "clipsearch index" in proc.stderr
    ok(run("index", str(catalogue), "--index", str(index_dir), "--model", "demo"))
    assert content(index_dir).keys() == before.keys()
    assert top_keys(index_dir) == top_keys(built[0])


def test_given_a_row_with_a_nan_vector_then_it_never_ranks_first_check_reports_it_and_index_reembeds_it(built, copy):
    _, catalogue, before = built
    victim = sorted(before)[0]
    db = sqlite3.connect(copy / DB_NAME)
    db.execute("UPDATE images SET vector = ? WHERE id = ?", (np.full(128, np.nan, np.float32).tobytes(), victim))
    db.commit()
    db.close()
    victim_key = before[victim][0]

    for text in ("a red circle", "a small blue star", "a green square"):
        keys = top_keys(copy, text, k=24)
        assert victim_key not in keys and len(keys) == 23
    proc = run("check", "--index", str(copy))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "1 rows have an unusable vector" in proc.stderr

    ok(run("index", "--model", "demo", str(catalogue), "--index", str(copy)))  # re-embeds the unusable row
    assert_same(content(copy), before)
    ok(run("check", "--index", str(copy)))


def test_given_a_nan_row_when_check_repair_then_it_is_dropped_and_the_rest_kept(built, copy):
    _, _, before = built
    victim = sorted(before)[-1]
    db = sqlite3.connect(copy / DB_NAME)
    db.execute("UPDATE images SET vector = ? WHERE id = ?", (b"\0\0\xc0\x7f" * 128, victim))
    db.commit()
    db.close()
    out = ok(run("check", "--repair", "--index", str(copy)))
    assert "dropped 1 rows" in out
    assert content(copy) == {k: v for k, v in before.items() if k != victim}


def test_given_check_on_a_missing_index_or_bad_usage_then_exit_2(tmp_path):
    proc = run("check", "--index", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "no index" in error_line(proc)
    proc = run("check", "--bogus")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


# Another user: reads the index folder (755) but cannot write it. Root can write anywhere, so it drops to nobody.
OTHER_USER = (
    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    if os.geteuid() == 0 and shutil.which("setpriv")
    else None
)
_READER = (
    "import sys\n"
    "import numpy as np\n"
    "from clipsearch.index.embedded import EmbeddedIndex\n"
    "index = EmbeddedIndex(sys.argv[1], read_only=True)\n"
    "q = np.ones(index.dim, np.float32) / np.sqrt(index.dim)\n"
    "for _ in sys.stdin:\n"
    "    print(len(index.search(q, k=1000)), index.count(), flush=True)\n"
)


def _counts(reader: subprocess.Popen) -> str:
    assert reader.stdin is not None and reader.stdout is not None
    reader.stdin.write("\n")
    reader.stdin.flush()
    return reader.stdout.readline().strip()


def _docs(start: int, n: int, dim: int = 8) -> list[Document]:
    vectors = np.random.default_rng(start).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [Document(key=f"/photos/{start + i}.jpg", vector=v) for i, v in enumerate(vectors)]


def test_given_a_reader_that_cannot_write_the_folder_then_it_sees_the_owners_commits(tmp_path):
    if OTHER_USER is None:
        pytest.skip("needs root and setpriv to read the index as another user")
    base = Path(tempfile.mkdtemp(prefix="clipsearch-shared-"))  # pytest's tmp_path is private to root
    readers: list[subprocess.Popen] = []
    try:
        base.chmod(0o755)
        index_dir = base / "index"
        writer = EmbeddedIndex(index_dir, model="fake", dim=8)
        writer.upsert(_docs(0, 5))
        writer.close()
        index_dir.chmod(0o755)
        writer = EmbeddedIndex(index_dir, model="fake", dim=8)  # its -wal is empty until it writes

        def reader() -> subprocess.Popen:
            proc = subprocess.Popen(
                [*OTHER_USER, sys.executable, "-c", _READER, str(index_dir)],
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            readers.append(proc)
            return proc

        # The owner's index is open (its -wal and -shm exist); the reader cannot create or write them.
        live = reader()
        assert _counts(live) == "5 5"
        writer.upsert(_docs(5, 3))
        assert _counts(live) == "8 8"
        writer.close()

        # No -wal, no -shm: the reader can only open the file immutable, and must notice the owner's writes.
        closed = reader()
        assert _counts(closed) == "8 8"
        writer = EmbeddedIndex(index_dir, model="fake", dim=8)
        writer.upsert(_docs(8, 2))
        writer.close()
        assert _counts(closed) == "10 10"
    finally:
        for proc in readers:
            proc.kill()
            _, err = proc.communicate()
            assert "Traceback" not in err, err
        shutil.rmtree(base)
