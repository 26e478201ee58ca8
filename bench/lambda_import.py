"""Cold-start import time of the Lambda functions, as deployed: only the package sam builds, no dev venv.

The function and the dependency layer are built with the same targets `sam build` runs
(functions/Makefile: build-SearchFunction, build-IngestFunction, build-DependenciesLayer), and boto3 /
botocore / s3transfer are installed beside them at this venv's versions, standing in for the copies the
Lambda runtime provides. Each run is a fresh `python3.X -S -X importtime` of the handler module, under
template.yaml's Runtime (the layer's wheels are built for it), with only those three folders on sys.path
(no site-packages), and the template's variables set to dummies, so packages that only the dev venv has
(awscrt, pyOpenSSL, torch) cannot leak into the figure.

    python bench/lambda_import.py                  # search and ingest, 15 runs each
    python bench/lambda_import.py --runs 5 --function search

Needs the package index (pip download of the layer's wheels) the first time; the wheels are cached.
Prints median / min / max of the handler module's cumulative import time, the biggest contributors
and the unzipped and zipped sizes of function + layer.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"search": "build-SearchFunction", "ingest": "build-IngestFunction"}
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer")
ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",  # pragma: allowlist secret
    "POWERTOOLS_SERVICE_NAME": "clipsearch",
    "POWERTOOLS_METRICS_NAMESPACE": "clipsearch",
    "CLIPSEARCH_OPENSEARCH_URL": "https://search.example.invalid",
    "CLIPSEARCH_OPENSEARCH_AUTH": "sigv4",
    "CLIPSEARCH_INDEX": "clipsearch",
    "CLIPSEARCH_MODEL": "RN50",
    "CLIPSEARCH_DIM": "1024",
    "CLIPSEARCH_ENDPOINT_NAME": "clip",
    "CLIPSEARCH_BUCKET": "images",
    "CLIPSEARCH_CORS_ORIGIN": "*",
    "CLIPSEARCH_URL_EXPIRY": "900",
    "CLIPSEARCH_QUEUE_URL": "https://sqs.example.invalid/1/q",
}
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def build(work: Path) -> dict[str, Path]:
    """Run the sam build targets into work/<name>; returns the folders by name."""
    dirs = {name: work / name for name in (*TARGETS, "layer", "runtime")}
    for name, target in (*TARGETS.items(), ("layer", "build-DependenciesLayer")):
        dirs[name].mkdir()
        subprocess.run(
            [
                "make",
                "-s",
                "-C",
                str(ROOT / "functions"),
                target,
                f"ARTIFACTS_DIR={dirs[name]}",
                f"PYTHON={sys.executable}",
            ],
            check=True,
        )
    pins = [f"{p}=={metadata.version(p)}" for p in RUNTIME_PACKAGES]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(dirs["runtime"]),
            *pins,
        ],
        check=True,
    )
    return dirs


@functools.cache
def runtime_python() -> Path:
    """This machine's interpreter for template.yaml's Runtime (python3.12 -> a working python3.12)."""
    found = re.search(r"^\s+Runtime:\s*(python(3\.\d+))\s*$", (ROOT / "template.yaml").read_text(), re.M)
    if not found:
        raise RuntimeError("template.yaml names no python Runtime")
    name, version = found.group(1), found.group(2)
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    # A pyenv shim answers for every installed version but fails unless that version is selected.
    for candidate in [shutil.which(name), *sorted(pyenv.glob(f"versions/{version}.*/bin/{name}"), reverse=True)]:
        if candidate is None:
            continue
        probe = subprocess.run(
            [str(candidate), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return Path(candidate)
    raise RuntimeError(f"no working {name} on this machine (pyenv install {version})")


def import_once(function: Path, layer: Path, runtime: Path, dev_venv: bool = False) -> tuple[float, dict[str, int]]:
    """Cumulative ms of `import app` in a bare interpreter, and each module's own microseconds.

    With dev_venv, the same module is imported the way it was measured before this script: this venv's
    interpreter, its site-packages and the source tree (`import functions.search.app`).
    """
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **ENV}
    if dev_venv:
        module = f"functions.{function.name}.app"
        cmd = [sys.executable, "-X", "importtime", "-c", f"import {module}"]
        cwd = ROOT
    else:
        module = "app"
        paths = [str(function), str(layer / "python"), str(runtime)]
        cmd = [
            str(runtime_python()),
            "-S",
            "-E",
            "-X",
            "importtime",
            "-c",
            f"import sys; sys.path[:0] = {paths!r}; import app",
        ]
        cwd = function
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    own: dict[str, int] = {}
    total = 0.0
    for m in LINE.finditer(proc.stderr):
        self_us, cumulative_us, indent, name = int(m[1]), int(m[2]), m[3], m[4]
        own[name] = own.get(name, 0) + self_us
        if name == module and len(indent) == 1:
            total = cumulative_us / 1000
    return total, own


def top_level(own: dict[str, int]) -> dict[str, float]:
    """Own time summed per top-level package, ms."""
    out: dict[str, float] = {}
    for module, us in own.items():
        key = module.split(".", 1)[0]
        out[key] = out.get(key, 0.0) + us / 1000
    return out


def size_mb(folders: list[Path]) -> tuple[float, float]:
    """Unzipped and zipped size of the folders together, MB."""
    raw = sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "package.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for d in folders:
                for f in d.rglob("*"):
                    if f.is_file():
                        z.write(f, f.relative_to(d))
        zipped = archive.stat().st_size
    return raw / 1e6, zipped / 1e6


def summarise(
    name: str, dev_venv: bool, results: list[tuple[float, dict[str, int]]], dirs: dict[str, Path]
) -> list[object]:
    totals = [t for t, _ in results]
    mean_own: dict[str, float] = {}
    for _, own in results:
        for key, ms in top_level(own).items():
            mean_own[key] = mean_own.get(key, 0.0) + ms / len(results)
    biggest = sorted(mean_own.items(), key=lambda kv: -kv[1])[:6]
    where = "dev venv + source tree (before)" if dev_venv else "as packaged by sam build"
    size = "-" if dev_venv else "{:.1f} / {:.1f}".format(*size_mb([dirs[name], dirs["layer"]]))
    return [name, where, median(totals), min(totals), max(totals), size, ", ".join(f"{k} {v:.0f}" for k, v in biggest)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--function", choices=[*TARGETS, "all"], default="all")
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.function == "all" else [args.function]

    print(f"machine: {machine()}, load {os.getloadavg()[0]:.1f}")
    work = Path(tempfile.mkdtemp(prefix="clipsearch-lambda-"))
    try:
        dirs = build(work)
        rows = []
        for name in names:
            # Interleaved, so that both interpreters see the same machine load.
            results: dict[bool, list[tuple[float, dict[str, int]]]] = {True: [], False: []}
            for _ in range(args.runs):
                for dev_venv in (True, False):
                    results[dev_venv].append(import_once(dirs[name], dirs["layer"], dirs["runtime"], dev_venv))
            rows += [summarise(name, dev_venv, results[dev_venv], dirs) for dev_venv in (True, False)]
        print(f"\n### Lambda cold-start import ({args.runs} fresh interpreters each, interleaved)\n")
        print(
            table(
                [
                    "function",
                    "interpreter",
                    "p50 ms",
                    "min ms",
                    "max ms",
                    "function + layer MB (unzipped / zip)",
                    "own ms by package (mean)",
                ],
                rows,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
