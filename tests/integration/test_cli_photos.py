"""What the CLI tells about a photo library's dates: each hit's capture time in the plain `search` output,
and how many pictures `index` dated by their file time because they carry no EXIF date."""

from __future__ import annotations

import datetime
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

CLI = [sys.executable, "-m", "clipsearch.cli"]
# The file time of every picture, read as wall-clock time in the zone the CLI runs in.
MTIME = datetime.datetime(2021, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
# name -> EXIF (DateTimeOriginal, OffsetTimeOriginal); None: a picture without any EXIF date.
PHOTOS: dict[str, tuple[str, str] | None] = {
    "beach.jpg": ("2019:07:14 15:02:11", "+02:00"),
    "birthday.jpg": ("2018:05:06 07:08:09", ""),
    "scan.png": None,
    "screenshot.jpg": None,
}
# What the plain output shows for each: the capture time as in --json, or the file time.
SHOWN = {
    "beach.jpg": "2019-07-14T15:02:11+02:00",
    "birthday.jpg": "2018-05-06T07:08:09",
    "scan.png": "2021-03-04T05:06:07",
    "screenshot.jpg": "2021-03-04T05:06:07",
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "TZ": "UTC", "TQDM_DISABLE": "1"},
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done


def write_photo(path: Path, colour: tuple[int, int, int], taken: tuple[str, str] | None) -> None:
    img = Image.new("RGB", (96, 72), (255, 255, 255))
    img.paste(colour, (24, 18, 72, 54))
    exif = Image.Exif()
    if taken is not None:
        when, offset = taken
        exif.get_ifd(0x8769)[0x9003] = when  # DateTimeOriginal
        if offset:
            exif.get_ifd(0x8769)[0x9011] = offset  # OffsetTimeOriginal
    buf = io.BytesIO()
    img.save(buf, format="PNG" if path.suffix == ".png" else "JPEG", exif=exif.tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    os.utime(path, (MTIME.timestamp(), MTIME.timestamp()))


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for n, (name, taken) in enumerate(PHOTOS.items()):
        write_photo(folder / name, (200, 40 * n, 30), taken)
    return folder


@pytest.fixture(scope="module")
def first_index(library: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    index_dir = tmp_path_factory.mktemp("index")
    done = run("index", str(library), "--model", "demo", "--index", str(index_dir))
    return index_dir, done.stdout.splitlines()[-1]


def test_given_pictures_without_exif_dates_when_indexed_then_the_summary_says_how_many_were_dated_by_file_time(
    first_index: tuple[Path, str],
) -> None:
    assert first_index[1].startswith("indexed 4,"), first_index[1]
    assert first_index[1].endswith("; 2 indexed without an EXIF capture date (dated by their file time)")


def test_given_an_indexed_library_when_indexed_again_then_only_newly_indexed_pictures_are_counted(
    first_index: tuple[Path, str], library: Path, tmp_path: Path
) -> None:
    index_dir = shutil.copytree(first_index[0], tmp_path / "index")  # the shared index stays as it is
    again = run("index", str(library), "--index", str(index_dir)).stdout.splitlines()[-1]
    assert again.startswith("indexed 0, unchanged 4,") and "EXIF" not in again, again
    write_photo(tmp_path / "later" / "scan-2.png", (10, 200, 30), None)
    added = run("index", str(tmp_path / "later"), "--index", str(index_dir)).stdout.splitlines()[-1]
    assert added.startswith("indexed 1,"), added
    assert added.endswith("; 1 indexed without an EXIF capture date (dated by their file time)"), added


def test_given_plain_search_output_when_printed_then_each_hit_shows_its_capture_time_and_offset(
    first_index: tuple[Path, str],
) -> None:
    out = run("search", "a red square", "-k", "10", "--index", str(first_index[0])).stdout.splitlines()
    shown = {}
    for line in out:
        rank, score, taken, path = line.split(maxsplit=3)
        assert int(rank) >= 1 and -1 <= float(score) <= 1
        shown[Path(path).name] = taken
    assert shown == SHOWN
