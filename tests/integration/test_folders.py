"""Folders as they really are, through the `clipsearch` CLI as a subprocess (demo model).

Odd file names, symbolic link loops, FIFOs and device nodes named .jpg, a huge sparse non-picture,
folders that cannot be listed, `forget`, two indexers at once, Ctrl-C, and the one-line messages.
Every fixture is made in the test. Each case checks: no traceback, the exit code, one clear line
for the problem, and what the index holds before and after (nothing lost).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from clipsearch.demo.catalogue import write_catalogue
from clipsearch.index.embedded import DB_NAME

CLI = [sys.executable, "-m", "clipsearch.cli"]
# Root lists any folder: the unlistable-folder runs drop the capabilities that let it.
NO_DAC = (
    ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if os.geteuid() == 0 and shutil.which("setpriv")
    else []
)


def start(*args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*(prefix or []), *CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="surrogateescape",
        env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
    )


def run(
    *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None, code: int = 0
) -> subprocess.CompletedProcess:
    """Run the CLI; assert its exit status and that no traceback reached the user."""
    proc = start(*args, env=env, prefix=prefix)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()  # a hung indexer (a FIFO read forever) must not outlive the test
        proc.communicate()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert "Traceback" not in err, err
    assert done.returncode == code, f"exit {done.returncode}, wanted {code}:\n{err}"
    return done


def keys(index_dir: Path) -> set[str]:
    """The keys the index holds, read straight from SQLite, as the OS spells the file names."""
    if not (index_dir / DB_NAME).exists():
        return set()
    db = sqlite3.connect(index_dir / DB_NAME)
    db.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
    try:
        return {r[0] for r in db.execute("SELECT key FROM images")}
    finally:
        db.close()


def warnings_for(stderr: str, path: str | Path) -> list[str]:
    prefix = f"warning: skipped {path}: "
    return [line[len(prefix) :] for line in stderr.splitlines() if line.startswith(prefix)]


def summary(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("indexed ")]
    assert len(lines) == 1, stdout
    return lines[0]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pictures")
    write_catalogue(folder, count=12)
    return sorted(folder.iterdir())


def copy_pictures(pictures: list[Path], folder: Path, n: int, start_at: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in pictures[start_at : start_at + n]:
        shutil.copyfile(src, folder / src.name)
        out.append(folder / src.name)
    return out


def test_given_names_that_are_not_utf8_or_hold_a_newline_then_indexed_and_round_trip(pictures, tmp_path):
    folder = tmp_path / "odd"
    good = copy_pictures(pictures, folder, 1)
    latin1 = os.fsencode(folder) + b"/caf\xe9.png"  # a Latin-1 name from an old camera
    shutil.copyfile(pictures[1], latin1)
    newline = folder / "two\nlines.png"
    shutil.copyfile(pictures[2], newline)
    index_dir = tmp_path / "idx"

    first = run("index", "--model", "demo", str(folder), "--index", str(index_dir))
    assert summary(first.stdout).startswith("indexed 3, unchanged 0, removed 0, skipped 0 of 3")
    stored = keys(index_dir)
    assert stored == {str(good[0]), os.fsdecode(latin1), str(newline)}
    assert all(os.path.isfile(k) for k in stored)  # each key names the same file again

    again = run("index", "--model", "demo", str(folder), "--index", str(index_dir))
    assert summary(again.stdout).startswith("indexed 0, unchanged 3")
    assert keys(index_dir) == stored

    response = json.loads(run("search", "a red circle", "-k", "3", "--json", "--index", str(index_dir)).stdout)
    shown = {h["key"] for h in response["hits"]}
    assert str(folder / "caf\ufffd.png") in shown  # each undecodable byte as U+FFFD, for display
    assert str(newline) in shown
    plain = run("search", "a red circle", "-k", "3", "--index", str(index_dir)).stdout.splitlines()
    assert len(plain) == 3  # the newline in a name does not break the one-line-per-hit output
    assert any(line.endswith("$'" + str(folder) + "/caf\\xe9.png'") for line in plain), plain
    assert any(line.endswith("$'" + str(folder) + "/two\\nlines.png'") for line in plain), plain

    forgot = run("forget", os.fsdecode(latin1), "--index", str(index_dir))
    assert forgot.stdout.startswith("forgot 1 picture(s)")
    assert keys(index_dir) == stored - {os.fsdecode(latin1)}


def test_given_loops_fifos_devices_and_a_huge_non_picture_then_each_skipped_by_name_and_the_run_finishes(
    pictures, tmp_path
):
    folder = tmp_path / "hostile"
    good = copy_pictures(pictures, folder, 2)
    outside = copy_pictures(pictures, tmp_path / "elsewhere", 1, start_at=2)[0]
    os.symlink(outside, folder / "linked.png")
    os.symlink("loop-b.jpg", folder / "loop-a.jpg")  # a file link loop
    os.symlink("loop-a.jpg", folder / "loop-b.jpg")
    os.symlink("dir-loop-2", folder / "dir-loop-1")  # a folder link loop
    os.symlink("dir-loop-1", folder / "dir-loop-2")
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "up")  # a link back up the tree
    os.symlink("gone.png", folder / "dangling.png")
    os.mkfifo(folder / "fifo.jpg")
    expected = {
        "loop-a.jpg": "symbolic link loop",
        "loop-b.jpg": "symbolic link loop",
        "dangling.png": "broken symbolic link",
        "fifo.jpg": "not a regular file (a FIFO)",
        "huge.jpg": "file too large",
    }
    if os.geteuid() == 0:
        os.mknod(folder / "zero.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero, named .jpg
        expected["zero.jpg"] = "not a regular file (a character device)"
    with open(folder / "huge.jpg", "wb") as f:
        f.truncate(3 * 1024**3)  # 3 GB, sparse: costs no disk; never to be read
    (folder / "notes.txt").write_text("not a picture")
    (folder / "layers.psd").write_bytes(b"8BPS\x00\x01")
    index_dir = tmp_path / "idx"

    first = run("index", "--model", "demo", str(folder), "--index", str(index_dir))
    for name, reason in expected.items():
        got = warnings_for(first.stderr, folder / name)
        assert len(got) == 1 and got[0].startswith(reason), (name, got, first.stderr)
    line = summary(first.stdout)
    assert line.startswith(f"indexed 3, unchanged 0, removed 0, skipped {len(expected)} of {len(expected) + 3}")
    assert "symbolic link loop: 2" in line  # the folder loop, counted
    assert "symbolic link to a folder (not followed): 1" in line
    assert "PSD pictures (format not supported): 1" in line and "not a picture (by name): 1" in line
    # The linked picture is stored under the link, where the user put it, not under its target.
    stored = keys(index_dir)
    assert stored == {*map(str, good), str(folder / "linked.png")}

    again = run("index", "--model", "demo", str(folder), "--index", str(index_dir))
    assert summary(again.stdout).startswith("indexed 0, unchanged 3, removed 0")  # nothing re-embedded
    assert keys(index_dir) == stored


def test_given_a_folder_that_cannot_be_listed_then_it_is_named_and_its_pictures_are_kept(pictures, tmp_path):
    if os.geteuid() == 0 and not NO_DAC:
        pytest.skip("root lists any folder and setpriv is not installed to drop that capability")
    folder = tmp_path / "share"
    copy_pictures(pictures, folder / "open", 2)
    copy_pictures(pictures, folder / "locked", 3, start_at=2)
    index_dir = tmp_path / "idx"
    run("index", "--model", "demo", str(folder), "--index", str(index_dir))
    before = keys(index_dir)
    assert len(before) == 5

    (folder / "locked").chmod(0)
    try:
        proc = run("index", "--model", "demo", str(folder), "--index", str(index_dir), prefix=NO_DAC)
    finally:
        (folder / "locked").chmod(0o755)
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert warned == [
        f"warning: cannot list folder {folder / 'locked'}: Permission denied; its indexed pictures are kept"
    ]
    line = summary(proc.stdout)
    assert line.startswith("indexed 0, unchanged 2, removed 0") and "3 of their indexed pictures kept" in line
    assert keys(index_dir) == before


def test_given_folders_nested_past_the_path_limit_then_the_deepest_is_named_not_passed_over(pictures, tmp_path):
    folder = tmp_path / "deep"
    copy_pictures(pictures, folder, 1)
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(24):  # 24 x 200 characters: past Linux's 4,096-byte PATH_MAX
            os.mkdir("d" * 200, dir_fd=fd)
            child = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    index_dir = tmp_path / "idx"
    proc = run("index", "--model", "demo", str(folder), "--index", str(index_dir))
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: cannot list folder ")]
    assert len(warned) == 1 and warned[0].endswith(": path too long for the system; its indexed pictures are kept")
    assert summary(proc.stdout).startswith("indexed 1,")
    assert len(keys(index_dir)) == 1


def test_given_forget_then_entries_at_or_below_the_path_go_by_whole_components_even_when_gone(pictures, tmp_path):
    base = tmp_path / "photos"
    b = copy_pictures(pictures, base / "b", 2)
    bc = copy_pictures(pictures, base / "bc", 2, start_at=2)
    index_dir = tmp_path / "idx"
    run("index", "--model", "demo", str(base / "b"), str(base / "bc"), "--index", str(index_dir))
    assert keys(index_dir) == {*map(str, b), *map(str, bc)}

    # A renamed folder: its old entries cannot be reached by `index` any more, only by `forget`.
    (base / "b").rename(base / "b-renamed")
    missing = run("index", "--model", "demo", str(base / "b"), "--index", str(index_dir), code=2)
    assert missing.stderr.strip() == f"clipsearch: error: no such file or folder: {base / 'b'}"
    proc = run("forget", str(base / "b") + "/", "--index", str(index_dir))
    assert proc.stdout.strip() == f"forgot 2 picture(s) at or below {base / 'b'}; index holds 2"
    assert keys(index_dir) == set(map(str, bc))  # /photos/bc is not below /photos/b

    nothing = run("forget", str(base / "b"), "--index", str(index_dir))
    assert nothing.stdout.startswith("forgot 0 picture(s)")
    assert keys(index_dir) == set(map(str, bc))


def _hold_writer_lock(index_dir: Path) -> int:
    """Take the index's writer lock as a running `clipsearch index` holds it (see ingest.writer_lock)."""
    fd = os.open(index_dir / "indexer.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_given_another_indexer_at_work_then_the_second_waits_with_a_message_and_ctrl_c_stops_it(pictures, tmp_path):
    folder = tmp_path / "pics"
    copy_pictures(pictures, folder, 3)
    index_dir = tmp_path / "idx"
    run("index", "--model", "demo", str(folder), "--index", str(index_dir))
    before = keys(index_dir)
    copy_pictures(pictures, folder, 2, start_at=3)

    fd = _hold_writer_lock(index_dir)
    try:
        waiting = start("index", "--model", "demo", str(folder), "--index", str(index_dir))
        assert waiting.stderr is not None
        line = waiting.stderr.readline()
        assert "is writing to the index" in line and "waiting for it to finish" in line, line
        waiting.send_signal(signal.SIGINT)  # the first Ctrl-C must stop it
        out, err = waiting.communicate(timeout=60)
    finally:
        os.close(fd)
    assert waiting.returncode == 130 and "Traceback" not in err
    assert err.strip() == "clipsearch: interrupted; committed work is kept, re-run to finish"
    assert keys(index_dir) == before

    fd = _hold_writer_lock(index_dir)
    second = start("index", "--model", "demo", str(folder), "--index", str(index_dir))
    assert second.stderr is not None and "waiting for it to finish" in second.stderr.readline()
    os.close(fd)  # the first one finishes: the second goes on
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0 and "Traceback" not in err
    assert summary(out).startswith("indexed 2, unchanged 3")
    assert len(keys(index_dir)) == 5


def test_given_two_indexers_started_together_then_the_pictures_are_embedded_once(pictures, tmp_path):
    folder = tmp_path / "pics"
    copy_pictures(pictures, folder, 8)
    index_dir = tmp_path / "idx"
    run("index", "--model", "demo", str(folder), "--index", str(index_dir), "--batch-size", "2")  # creates the index
    copy_pictures(pictures, folder / "new", 4, start_at=8)
    procs = [
        start("index", "--model", "demo", str(folder), "--index", str(index_dir), "--batch-size", "1") for _ in range(2)
    ]
    results = [(p.communicate(timeout=300), p.returncode) for p in procs]
    indexed = 0
    for (out, err), code in results:
        assert code == 0 and "Traceback" not in err, err
        indexed += int(summary(out).split(",")[0].split()[1])
    assert indexed == 4  # the second found the first one's work done
    assert len(keys(index_dir)) == 12


def test_given_an_empty_index_when_searching_then_it_says_so_and_how_to_fill_it(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    index_dir = tmp_path / "idx"
    run("index", "--model", "demo", str(empty), "--index", str(index_dir))
    assert keys(index_dir) == set()
    proc = run("search", "a red circle", "--index", str(index_dir))
    assert proc.stdout.strip() == (
        f"no results: the index is empty; fill it with `clipsearch index PATH --index {index_dir}`"
    )
    as_json = run("search", "a red circle", "--json", "--index", str(index_dir))
    assert json.loads(as_json.stdout)["hits"] == []
    assert as_json.stderr.strip().startswith("clipsearch: no results: the index is empty")


@pytest.mark.parametrize(
    "case", ["port out of range", "index is a file", "home not writable", "demo home not writable"]
)
def test_given_bad_arguments_or_settings_then_one_line_and_exit_2(case, pictures, tmp_path):
    folder = tmp_path / "pics"
    copy_pictures(pictures, folder, 1)
    a_file = folder / pictures[0].name
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    home = {"CLIPSEARCH_HOME": str(locked / "home")}
    if case in ("home not writable", "demo home not writable") and os.geteuid() == 0 and not NO_DAC:
        pytest.skip("root writes anywhere and setpriv is not installed to drop that capability")
    if case == "port out of range":  # an index that opens, so the port is what fails
        run("index", "--model", "demo", str(folder), "--index", str(tmp_path / "idx"))
    args, env, prefix, expect = {
        "port out of range": (
            ["serve", "--port", "180003", "--index", str(tmp_path / "idx")],
            None,
            None,
            "180003 is not a port number",
        ),
        "index is a file": (
            ["index", "--model", "demo", str(folder), "--index", str(a_file)],
            None,
            None,
            "--index takes a folder",
        ),
        "home not writable": (["index", "--model", "demo", str(folder)], home, NO_DAC, "Permission denied"),
        "demo home not writable": (["demo", "--count", "2"], home, NO_DAC, "Permission denied"),
    }[case]
    proc = run(*args, env=env, prefix=prefix, code=2)
    assert proc.stderr.count("\n") == 1 and "error: " in proc.stderr and expect in proc.stderr, proc.stderr
    assert a_file.read_bytes() == pictures[0].read_bytes()  # nothing written over the file
    assert not (locked / "home").exists()


@pytest.mark.parametrize("command", ["index a new index", "forget", "check --repair"])
def test_given_another_writer_holds_the_lock_then_index_forget_and_repair_wait_before_touching_the_index(
    command, pictures, tmp_path
):
    folder = tmp_path / "pics"
    copy_pictures(pictures, folder, 3)
    index_dir = tmp_path / "idx"
    if command == "index a new index":
        index_dir.mkdir()
        args = ["index", "--model", "demo", str(folder), "--index", str(index_dir)]
    else:
        run("index", "--model", "demo", str(folder), "--index", str(index_dir))
        args = (
            [command, str(folder), "--index", str(index_dir)]
            if command == "forget"
            else ["check", "--repair", "--index", str(index_dir)]
        )
    before = keys(index_dir)

    fd = _hold_writer_lock(index_dir)
    try:
        waiting = start(*args)
        assert waiting.stderr is not None
        line = waiting.stderr.readline()
        assert "is writing to the index" in line and "waiting for it to finish" in line, line
        assert keys(index_dir) == before  # nothing created, removed or repaired meanwhile
        assert (index_dir / DB_NAME).exists() == bool(before)
    finally:
        os.close(fd)
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0 and "Traceback" not in err, err
    if command == "forget":
        assert keys(index_dir) == set()
    else:
        assert len(keys(index_dir)) == 3


def test_given_rows_with_unusable_vectors_then_reindex_drops_the_gone_ones_and_re_embeds_the_rest(pictures, tmp_path):
    folder = tmp_path / "pics"
    files = copy_pictures(pictures, folder, 4)
    index_dir = tmp_path / "idx"
    run("index", "--model", "demo", str(folder), "--index", str(index_dir))
    db = sqlite3.connect(index_dir / DB_NAME)
    for key in map(str, files[:2]):
        db.execute("UPDATE images SET vector = ? WHERE key = ?", (b"\0" * 5, key))
    db.commit()
    db.close()
    files[0].unlink()
    proc = run("index", "--model", "demo", str(folder), "--index", str(index_dir))
    assert summary(proc.stdout).startswith("indexed 1, unchanged 2, removed 1")
    assert keys(index_dir) == set(map(str, files[1:]))
