"""The `clipsearch` command line: the only place that prints, reads argv or exits."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from clipsearch import errors
from clipsearch.index import default_home, open_index
from clipsearch.index.base import VectorIndex

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
USAGE_ERRORS = (
    errors.BadRequest,
    errors.NotFound,
    errors.ModelMismatch,
    errors.ModelUnavailable,
    errors.ConfigError,
    errors.UnsupportedMediaType,
    errors.PayloadTooLarge,
    errors.IndexCorrupt,
    errors.IndexReadOnly,
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_index_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument(
        "--index", help="embedded: index folder (default $CLIPSEARCH_HOME or XDG data dir); opensearch: index name"
    )
    p.add_argument("--backend", choices=("embedded", "opensearch"), default="embedded")
    p.add_argument(
        "--opensearch-url",
        default=os.environ.get("CLIPSEARCH_OPENSEARCH_URL"),
        help="OpenSearch base URL (default $CLIPSEARCH_OPENSEARCH_URL)",
    )
    p.add_argument(
        "--search-mode",
        choices=("exact", "approx"),
        default=os.environ.get("CLIPSEARCH_SEARCH_MODE", "exact"),
        help="embedded backend: exact cosine (default) or the opt-in approximate index",
    )
    if model:
        p.add_argument(
            "--model",
            help="ViT-B/32 (a new index's default; an existing index keeps its own), "
            "another CLIP name such as RN50, demo, or a checkpoint path; see `clipsearch models`",
        )


def _add_bulk_load(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bulk-load",
        action="store_true",
        help="opensearch: a large first load (no refresh or replicas until done, larger and parallel bulks)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clipsearch", description="Text-and-image search with CLIP.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="index images under folders or files")
    p.add_argument("paths", nargs="+", metavar="PATH")
    _add_index_options(p)
    p.add_argument(
        "--batch-size", type=_positive, default=32, help="pictures encoded and committed together (default 32)"
    )
    p.add_argument("--workers", type=_positive, default=2, help="decoding threads")
    _add_bulk_load(p)

    p = sub.add_parser(
        "search",
        help="search by text, by an image, or by weighted terms",
        description='Search by TERMs, in rclip\'s syntax: clipsearch search "2:golden retriever" + ./pool.jpg - fruit. '
        "A + or - standing alone separates terms and adds or subtracts the next one (so t-shirt and "
        "2018-2020 stay text); W:TERM gives a term the weight W; a term that names an existing file is "
        "an image. The query is the normalised weighted sum of the terms' vectors.",
    )
    p.add_argument("text", nargs="*", metavar="TERM", help="a text, or an image file; + and - join terms")
    p.add_argument(
        "--image", help="an image file to search with; with TERMs too, it is one more term of weight 1 (+ FILE)"
    )
    p.add_argument(
        "--hybrid",
        action="store_true",
        help="fuse a word search of titles and paths with the vector ranking (RRF); for one text only",
    )
    p.add_argument("-k", type=_positive, default=10, help="how many results (default 10)")
    p.add_argument(
        "--from",
        dest="offset",
        type=_non_negative,
        default=0,
        help="skip this many results first, for paging (default 0)",
    )
    p.add_argument("--min-score", type=float, help="only results with at least this cosine score (-1 to 1)")
    p.add_argument("--under", help="only results whose path or key starts with this prefix")
    p.add_argument(
        "--after",
        metavar="DATE",
        help="only pictures taken on or after DATE (inclusive): YYYY, YYYY-MM, YYYY-MM-DD or "
        "YYYY-MM-DDTHH:MM[:SS], as the camera's clock read (no time zone)",
    )
    p.add_argument(
        "--before", metavar="DATE", help="only pictures taken before DATE (exclusive: --before 2020 ends on 2019-12-31)"
    )
    p.add_argument(
        "--no-dates",
        dest="dates",
        action="store_false",
        help='search the TEXT as written: without this, date words ("summer 2019", "last year") become a '
        "capture-time filter and CLIP reads the rest (docs/dates.md)",
    )
    p.add_argument("--json", action="store_true", help="print the REST response object")
    _add_index_options(p)

    p = sub.add_parser("duplicates", help="list groups of duplicate pictures: exact copies and near ones")
    p.add_argument(
        "--kind",
        choices=("exact", "near", "all"),
        default="all",
        help="exact: the same bytes; near: the same picture re-encoded, resized or lightly cropped (default all)",
    )
    p.add_argument("--limit", type=_positive, default=50, help="how many groups, at most 200 (default 50)")
    p.add_argument("--from", dest="offset", type=_non_negative, default=0, help="skip this many groups first")
    p.add_argument("--json", action="store_true", help="print the REST response object")
    _add_index_options(p, model=False)

    p = sub.add_parser("stats", help="show the index's figures")
    p.add_argument("--json", action="store_true")
    _add_index_options(p, model=False)

    p = sub.add_parser("serve", help="serve the REST API and the web page")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0-65535 (default 8000; 0: any free port)")
    p.add_argument("--max-body-mb", type=_positive, default=10, help="largest request body in MB (default 10)")
    _add_index_options(p)

    p = sub.add_parser("check", help="check the embedded index's integrity; --repair fixes what it can")
    p.add_argument("--index", help="index folder (default $CLIPSEARCH_HOME or XDG data dir)")
    p.add_argument(
        "--repair",
        action="store_true",
        help="move a damaged file aside and keep what can be read; drop rows with unusable vectors "
        "so the next `clipsearch index` re-embeds them",
    )

    p = sub.add_parser("forget", help="remove the index entries at or below a path (it need not exist any more)")
    p.add_argument("path", metavar="PATH", help="a file or folder, matched by whole path components")
    _add_index_options(p, model=False)

    p = sub.add_parser(
        "reindex",
        help="rebuild the index with another model beside the old one, then switch to it (no downtime)",
    )
    p.add_argument("--model", required=True, help="the new model: a CLIP name such as RN50, demo, or a checkpoint path")
    p.add_argument(
        "--drop-old",
        action="store_true",
        help="delete the old index after the switch (default: keep it, e.g. to switch back by hand)",
    )
    steps = p.add_mutually_exclusive_group()
    steps.add_argument(
        "--prepare",
        action="store_true",
        help="opensearch, for AWS: only create the new empty index and print its name (then backfill it)",
    )
    steps.add_argument(
        "--switch", metavar="PHYSICAL", help="opensearch, for AWS: only move the index name to PHYSICAL, once filled"
    )
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--workers", type=_positive, default=2, help="decoding threads")
    _add_index_options(p, model=False)

    p = sub.add_parser("demo", help="generate a demo catalogue, index it and search it (offline)")
    p.add_argument("--dir", help="where to put the demo catalogue and index (default $CLIPSEARCH_HOME/demo)")
    p.add_argument("--count", type=_positive, default=240)

    p = sub.add_parser("package-model", help="write model.tar.gz for the SageMaker endpoint")
    p.add_argument("--model", default="RN50", help="demo, a CLIP name such as RN50, or a checkpoint path")
    p.add_argument("--out", default="model.tar.gz")

    p = sub.add_parser("backfill", help="index images already in S3 (via the ingest queue or a batch transform)")
    p.add_argument("url", metavar="s3://BUCKET/PREFIX")
    p.add_argument(
        "--queue-url",
        default=os.environ.get("CLIPSEARCH_QUEUE_URL"),
        help="the ingest queue (stack output IngestQueueUrl; default $CLIPSEARCH_QUEUE_URL)",
    )
    p.add_argument(
        "--batch-transform",
        action="store_true",
        help="encode with a SageMaker batch transform job, then bulk-load the vectors",
    )
    p.add_argument("--sagemaker-model", help="model for the transform job (stack output TransformModelName)")
    p.add_argument("--instance-type", default="ml.m5.xlarge")
    p.add_argument("--output", help="s3:// URL for the transform output (default s3://BUCKET/_clipsearch-batch/JOB/)")
    _add_index_options(p)
    _add_bulk_load(p)
    p.set_defaults(backend="opensearch")

    p = sub.add_parser("models", help="list the models --model takes, their dimensions and which are cached")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("copy", help="copy an index's documents and vectors into another index (no re-encoding)")
    _add_index_options(p, model=False)
    p.add_argument("--to-backend", choices=("embedded", "opensearch"), required=True)
    p.add_argument(
        "--to-index",
        required=True,
        help="the destination's folder (embedded) or name (opensearch); created with the source's model if missing",
    )
    p.add_argument("--to-opensearch-url", help="the destination's OpenSearch URL (default: --opensearch-url)")
    p.add_argument("--to-bucket", help="with --strip-prefix: the S3 bucket the pictures were uploaded to")
    p.add_argument(
        "--strip-prefix",
        metavar="FOLDER",
        help="with --to-bucket: FOLDER/x becomes key x in the bucket; documents not under FOLDER are left out",
    )
    p.add_argument("--batch-size", type=_positive, default=500, help="documents read and written together")
    p.add_argument(
        "--rewrite", action="store_true", help="also write documents the destination has with the same size and mtime"
    )
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _open(
    args: argparse.Namespace, model: str | None = None, dim: int | None = None, read_only: bool = False
) -> VectorIndex:
    options: dict[str, Any] = {}
    if read_only and args.backend == "embedded":
        options["read_only"] = True  # search, stats, serve: never create, migrate or write the index
    if args.backend == "opensearch":
        if not args.opensearch_url:
            raise errors.ConfigError("--backend opensearch needs --opensearch-url or CLIPSEARCH_OPENSEARCH_URL")
        options["url"] = args.opensearch_url
        options["auth"] = os.environ.get("CLIPSEARCH_OPENSEARCH_AUTH", "none")
        if getattr(args, "bulk_load", False):
            from clipsearch.index.opensearch import BULK_LOAD

            options.update(BULK_LOAD)
    elif getattr(args, "bulk_load", False):
        raise errors.ConfigError("--bulk-load is for --backend opensearch")
    elif getattr(args, "search_mode", "exact") != "exact":
        options["search_mode"] = args.search_mode
    return open_index(args.backend, args.index, model=model, dim=dim, **options)


def _open_for_query(args: argparse.Namespace) -> VectorIndex:
    """Open an existing index; --model, when given, must be the model that built it."""
    index = _open(args, read_only=True)
    if args.model is not None:
        from clipsearch import models
        from clipsearch.index.base import check_model

        check_model(index.model, index.dim, models.canonical_spec(args.model), None)
    return index


def _writing(args: argparse.Namespace, create: bool = False) -> contextlib.AbstractContextManager[None]:
    """The embedded index's writer lock (ingest.writer_lock), held by every command that writes it (`index`,
    `forget`, `check --repair`): one writer at a time, the others wait with a message. Where the index
    folder does not exist (and is not to be created) or cannot be written, opening it says why instead."""
    if getattr(args, "backend", "embedded") != "embedded":
        return contextlib.nullcontext()
    from clipsearch.index.embedded import _writable
    from clipsearch.ingest import writer_lock

    directory = Path(args.index).expanduser() if args.index else default_home() / "index"
    if create and not directory.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            return contextlib.nullcontext()
    if not directory.is_dir() or not _writable(directory):
        return contextlib.nullcontext()
    return writer_lock(directory, on_wait=_waiting)


def _loading(args: argparse.Namespace, index: VectorIndex) -> contextlib.AbstractContextManager[None]:
    """--bulk-load: the OpenSearch index tuned for the load, and its settings put back however the run ends."""
    bulk_load = getattr(index, "bulk_load", None)
    return bulk_load() if args.bulk_load and bulk_load else contextlib.nullcontext()


def _upsert_batch(args: argparse.Namespace) -> int:
    """Documents per upsert for backfill: with --bulk-load, enough to keep every bulk client busy."""
    from clipsearch.aws.backfill import UPSERT_BATCH

    if not args.bulk_load:
        return UPSERT_BATCH
    from clipsearch.index.opensearch import BULK_LOAD

    return BULK_LOAD["max_bulk_docs"] * BULK_LOAD["bulk_clients"]


def _waiting(message: str) -> None:
    print(f"clipsearch: {message}", file=sys.stderr, flush=True)


def _encoder(spec: str) -> Any:
    from clipsearch.encoders import LocalEncoder

    return LocalEncoder(spec, progress=_DownloadBar())


class _DownloadBar:
    """A model's first download on stderr: one line always, and a tqdm bar when stderr is a terminal."""

    def __init__(self) -> None:
        self._bar: Any = None

    def note(self, line: str) -> None:
        print(f"clipsearch: {line}", file=sys.stderr, flush=True)

    def advance(self, done: int, total: int | None) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="downloading",
                file=sys.stderr,
                dynamic_ncols=True,
                disable=None,
            )
        self._bar.update(done - self._bar.n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def cmd_index(args: argparse.Namespace) -> int:
    from clipsearch import models

    spec = models.canonical_spec(args.model or models.DEFAULT)  # a new index; an existing one keeps its own
    try:
        existing = _open(args, read_only=True)
        if args.model is None:
            spec = existing.model
        existing.close()
    except errors.NotFound:
        pass
    # The model first: offline and uncached exits 2 here, before anything (folder, lock) is written.
    encoder = _encoder(spec)
    # The lock comes before the index is opened for writing: two first runs must not both create it.
    with _writing(args, create=True):
        return _index(args, encoder)


def _index(args: argparse.Namespace, encoder: Any) -> int:
    from tqdm import tqdm

    from clipsearch.ingest import index_paths

    index = _open(args, model=encoder.model, dim=encoder.dim)
    bar = tqdm(total=0, unit="img", desc="indexing", file=sys.stderr, dynamic_ncols=True, disable=None)

    def plan(n: int) -> None:
        bar.total = n
        bar.refresh()

    def skipped(path: str, reason: str) -> None:
        bar.write(f"warning: skipped {shown(path)}: {reason}", file=sys.stderr)

    def unlisted(folder: str, reason: str) -> None:
        bar.write(
            f"warning: cannot list folder {shown(folder)}: {reason}; its indexed pictures are kept", file=sys.stderr
        )

    try:
        with _loading(args, index):
            summary = index_paths(
                args.paths,
                encoder,
                index,
                batch_size=args.batch_size,
                workers=args.workers,
                on_skip=skipped,
                on_progress=bar.update,
                on_plan=plan,
                on_unlisted=unlisted,
            )
    finally:
        bar.close()
    ignored = ""
    if summary.ignored:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(summary.ignored.items(), key=lambda x: -x[1]))
        ignored = f"; ignored {sum(summary.ignored.values())} ({reasons})"
    if summary.mtime_dated:
        ignored += f"; {summary.mtime_dated} indexed without an EXIF capture date (dated by their file time)"
    if summary.dated:
        ignored += f"; read the capture dates of {summary.dated} unchanged pictures indexed without them"
    if summary.hashed:
        ignored += f"; hashed {summary.hashed} unchanged pictures indexed without a perceptual hash"
    if summary.unlisted:
        ignored += (
            f"; {len(summary.unlisted)} folder(s) could not be listed, {summary.kept} of their indexed pictures kept"
        )
    print(
        f"indexed {summary.indexed}, unchanged {summary.unchanged}, removed {summary.deleted}, "
        f"skipped {len(summary.skipped)} of {summary.seen} images in {summary.seconds:.1f}s "
        f"({summary.images_per_second:.1f} images/s); index holds {index.count()}{ignored}"
    )
    return EXIT_OK


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\udc80-\udcff]")


def shown(path: str) -> str:
    """A path printed on one line: as it is, or, if it holds control characters or bytes that are not
    UTF-8, quoted as the shell's $'...' (a newline as \\n, a Latin-1 byte as \\xe9), so it can be pasted back."""
    if not _UNPRINTABLE.search(path):
        return path

    def escape(m: re.Match[str]) -> str:
        c = m.group()
        named = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
        if c in named:
            return named[c]
        if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode escaped it
            return f"\\x{ord(c) - 0xDC00:02x}"
        return f"\\x{ord(c):02x}" if ord(c) < 0x80 else f"\\u{ord(c):04x}"

    body = _UNPRINTABLE.sub(escape, path.replace("\\", "\\\\").replace("'", "\\'"))
    return f"$'{body}'"


def _prefix(args: argparse.Namespace) -> str | None:
    if not args.under:
        return None
    if args.backend == "embedded" and Path(args.under).expanduser().exists():
        under = Path(args.under).expanduser().resolve()
        return str(under) + (os.sep if under.is_dir() else "")
    return str(args.under)


def cmd_search(args: argparse.Namespace) -> int:
    from clipsearch.search import SearchService, date_range

    if not args.text and args.image is None:
        raise errors.BadRequest("give a search TEXT, --image FILE, or terms joined by + and -")
    index = _open_for_query(args)
    if args.min_score is not None and not -1.0 <= args.min_score <= 1.0:
        raise errors.BadRequest("--min-score must be a cosine between -1 and 1")
    options: dict[str, Any] = {
        "k": args.k,
        "offset": args.offset,
        "min_score": args.min_score,
        "prefix": _prefix(args),
        "taken": date_range(args.after, args.before, prefix="--"),
        "mode": "hybrid" if args.hybrid else "vector",
    }
    request = _search_request(args.text, args.image, args.dates, options)
    service = SearchService(_encoder(index.model), index, url_for=lambda hit: f"/images/{hit.id}")
    response = service.search(request)
    if args.json:
        print(json.dumps(response, ensure_ascii=False))
        if not response["hits"] and not index.count():
            print(f"clipsearch: {_empty_index_note(args)}", file=sys.stderr)
        return EXIT_OK
    if not response["hits"]:
        print("no results" if index.count() else _empty_index_note(args))
    for rank, hit in enumerate(response["hits"], start=args.offset + 1):
        fused = f"  rrf {hit['rank_score']:.4f}" if "rank_score" in hit else ""
        # The capture time as in the JSON (EXIF offset appended when known); "-": not known (schema 1).
        print(f"{rank:3d}  {hit['score']:+.4f}{fused}  {hit['taken_at'] or '-':<25}  {shown(_real_key(index, hit))}")
    return EXIT_OK


def _search_request(words: list[str], image: str | None, dates: bool, options: dict[str, Any]) -> Any:
    """The request for the CLI's terms (rclip's syntax, clipsearch.terms.parse_argv) and --image FILE.

    One text or one picture of weight 1 is a plain text or image query (a text's date words become its
    taken_at filter unless --no-dates); anything else is weighted terms.
    """
    from clipsearch.search import SearchRequest, text_request
    from clipsearch.terms import MAX_TERMS, Term, parse_argv

    if words and not "".join(words).strip():
        raise errors.BadRequest("the search text is empty")
    parsed = parse_argv(words) + ([("image", 1.0, image)] if image is not None else [])
    terms = []
    for kind, weight, value in parsed:
        if kind == "image":
            try:
                terms.append(Term("image", weight, image=Path(value).expanduser().read_bytes()))
            except OSError as e:
                raise errors.BadRequest(f"cannot read {value}: {e.strerror or e}") from None
        else:
            terms.append(Term("text", weight, text=value))
    if len(terms) == 1 and terms[0].weight == 1.0:
        if terms[0].kind == "text":
            return text_request(terms[0].text or "", dates, **options)
        # The file name tells the decode a camera RAW file (its preview, not its thumbnail).
        return SearchRequest("image", image=terms[0].image, name=Path(parsed[0][2]).name, **options)
    if len(terms) > MAX_TERMS:
        raise errors.BadRequest(f"at most {MAX_TERMS} terms, --image included")
    return SearchRequest("terms", terms=tuple(terms), **options)


def cmd_duplicates(args: argparse.Namespace) -> int:
    from clipsearch import duplicates
    from clipsearch.search import hit_json

    params = {"kind": args.kind, "limit": str(args.limit), "from": str(args.offset)}
    index = _open(args, read_only=True)
    request = duplicates.parse_params(params)
    response = duplicates.duplicates(index, request, lambda hit: hit_json(hit, f"/images/{hit.id}"))
    if args.json:
        print(json.dumps(response, ensure_ascii=False))
        return EXIT_OK
    if not response["groups"]:
        print("no duplicates" if index.count() else _empty_index_note(args))
    for number, group in enumerate(response["groups"], start=args.offset + 1):
        print(f"{number:3d}  {group['kind']}, {group['count']} pictures")
        for hit in group["hits"]:
            print(f"     {hit['score']:+.4f}  {shown(_real_key(index, hit))}")
    if response["next_from"] is not None:
        print(f"more: --from {response['next_from']}")
    return EXIT_OK


def _real_key(index: VectorIndex, hit: dict[str, Any]) -> str:
    """A hit's key as the file is named: the response shows undecodable bytes as U+FFFD."""
    if "\ufffd" not in hit["key"]:
        return str(hit["key"])
    doc = index.get(hit["id"])
    return doc.key if doc is not None else str(hit["key"])


def _empty_index_note(args: argparse.Namespace) -> str:
    where = f" --index {shlex.quote(args.index)}" if args.index else ""
    if args.backend != "embedded":
        where += f" --backend {args.backend}"
    return f"no results: the index is empty; fill it with `clipsearch index PATH{where}`"


def cmd_stats(args: argparse.Namespace) -> int:
    info = _open(args, read_only=True).info().as_dict()
    if args.json:
        print(json.dumps(info))
    else:
        for name, value in info.items():
            print(f"{name:>16}: {value}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from clipsearch.http.server import logger, serve

    named = _open_for_query(args)
    index = _pinned(named)
    # The server's lines (one a request) go to stderr as they are; uvicorn's own only when they are errors.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name, level in ((logger.name, logging.INFO), ("uvicorn.error", logging.ERROR)):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).propagate = False
    serve(
        index,
        _encoder(index.model),
        host=args.host,
        port=args.port,
        max_body=args.max_body_mb * 1024 * 1024,
        follow=_follower(args, named, logger.info),
    )
    return EXIT_OK


def _pinned(index: VectorIndex) -> VectorIndex:
    """An OpenSearch index by its physical name (OpenSearchIndex.pinned): never another model's vectors."""
    from clipsearch.index.opensearch import OpenSearchIndex

    return index.pinned() if isinstance(index, OpenSearchIndex) else index


def _follower(args: argparse.Namespace, named: VectorIndex, log: Callable[[str], None]) -> Any:
    """What lets `serve` follow a `clipsearch reindex` switch: it watches the pointer file or the alias."""
    from clipsearch.follow import Follower
    from clipsearch.index.generations import pointer_target
    from clipsearch.index.opensearch import OpenSearchIndex

    if isinstance(named, OpenSearchIndex):
        targets = named.targets  # the physical index behind the alias

        def where() -> str:
            return ",".join(targets())
    else:
        root = Path(args.index).expanduser() if args.index else default_home() / "index"

        def where() -> str:
            return pointer_target(root) or ""

    return Follower(where, lambda: _pinned(_open(args, read_only=True)), _encoder, log=log)


def _opensearch_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"url": args.opensearch_url, "auth": os.environ.get("CLIPSEARCH_OPENSEARCH_AUTH", "none")}


def _reindex_step(args: argparse.Namespace, spec: str) -> int:
    """One step of the AWS procedure (docs/deploy.md): --prepare the new index, or --switch to it once filled."""
    from clipsearch import models, reindex
    from clipsearch.index.opensearch import OpenSearchIndex

    if args.backend != "opensearch":
        raise errors.ConfigError("--prepare and --switch are steps of the AWS procedure: give --backend opensearch")
    name = args.index or "clipsearch"
    current = OpenSearchIndex(name, **_opensearch_options(args))
    try:
        if args.switch:
            dropped = reindex.switch_opensearch(current, args.switch, spec, drop_old=args.drop_old)
            gone = f"; deleted {', '.join(dropped)}" if dropped else ""
            print(f"{name} now leads to {args.switch} ({spec}){gone}")
            return EXIT_OK
        reindex.require_new_model(current.model, spec)
        dim = models.DEMO_DIM if spec == models.DEMO else models.KNOWN_DIMS.get(spec) or _encoder(spec).dim
        physical = current.next_physical(spec)
        OpenSearchIndex(physical, spec, dim, alias=name, **_opensearch_options(args)).close()
        print(physical)
        return EXIT_OK
    finally:
        current.close()


def cmd_reindex(args: argparse.Namespace) -> int:
    from clipsearch import models, reindex

    spec = models.canonical_spec(args.model)
    if args.prepare or args.switch:
        return _reindex_step(args, spec)
    old = _open(args, read_only=True)
    try:  # before the model loads: no index, the same model or S3 objects are no reason to load it
        reindex.originals(old, spec)
    finally:
        old.close()
    encoder = _encoder(spec)
    ingest: dict[str, Any] = {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "on_skip": lambda path, reason: print(f"warning: skipped {shown(path)}: {reason}", file=sys.stderr),
    }
    print(f"building a new index with {spec} beside the old one; searches use the old one meanwhile", file=sys.stderr)

    def on_resume(name: str, done: int, total: int) -> None:
        print(
            f"resuming {name}, which an earlier reindex began: {done} of {total} images already encoded",
            file=sys.stderr,
        )

    if args.backend == "embedded":
        root = Path(args.index).expanduser() if args.index else default_home() / "index"

        def open_at(folder: Path, model: str | None, dim: int | None) -> VectorIndex:
            return open_index("embedded", str(folder), model=model, dim=dim, read_only=model is None)

        with _writing(args):
            summary = reindex.reindex_embedded(
                root, encoder, open_at, drop_old=args.drop_old, on_resume=on_resume, **ingest
            )
    else:
        from clipsearch.index.opensearch import OpenSearchIndex

        options = _opensearch_options(args)
        name = args.index or "clipsearch"
        current = OpenSearchIndex(name, **options)

        def open_physical(physical: str) -> OpenSearchIndex:
            return OpenSearchIndex(physical, encoder.model, encoder.dim, alias=name, **options)

        try:
            summary = reindex.reindex_opensearch(
                current, encoder, open_physical, drop_old=args.drop_old, on_resume=on_resume, **ingest
            )
        finally:
            current.close()
    built = summary.ingest
    print(
        f"reindexed {built.indexed} of {built.seen} images with {summary.new_model} into {summary.new} "
        f"(was {summary.old_model}); searches now use it"
    )
    if summary.gone:
        print(f"warning: {len(summary.gone)} indexed files are gone, e.g. {shown(summary.gone[0])}", file=sys.stderr)
    if summary.dropped:
        print(f"deleted the old index: {', '.join(summary.dropped)}")
    elif args.drop_old and built.skipped:
        print(
            f"the old index is kept in {summary.old}, --drop-old or not: {len(built.skipped)} files could not be "
            "read now, and their only vectors are there",
            file=sys.stderr,
        )
    else:
        print(f"the old index is kept in {summary.old}: delete it once no server uses it (or reindex with --drop-old)")
    return EXIT_FAILED if built.skipped else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from clipsearch.index.embedded import check_index, repair_command
    from clipsearch.index.generations import resolve

    directory = Path(args.index).expanduser() if args.index else default_home() / "index"
    with _writing(args) if args.repair else contextlib.nullcontext():
        report = check_index(resolve(directory), repair=args.repair)  # the database `current` names, if any

    def text(line: str) -> str:  # a file name's bytes that are not UTF-8 shown as \xNN
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

    for line in report.repaired:
        print(f"repaired: {text(line)}")
    for line in report.notes:
        print(f"note: {text(line)}")
    for line in report.problems:
        print(f"problem: {text(line)}", file=sys.stderr)
    if report.problems:
        if not args.repair:
            print(
                f"clipsearch: {report.path}: {len(report.problems)} problem(s); run "
                f"`{repair_command(directory)}` to fix them",
                file=sys.stderr,
            )
        return EXIT_FAILED
    rows = "" if report.rows is None else f", {report.rows} rows"
    print(f"{report.path}: {'repaired' if report.repaired else 'ok'}{rows}")
    return EXIT_OK


def cmd_forget(args: argparse.Namespace) -> int:
    from clipsearch.ingest import forget, forget_key

    with _writing(args):
        index = _open(args)
        try:
            removed = forget(index, args.path)
            where = " or ".join(shown(k) for k in forget_key(args.path))
            print(f"forgot {removed} picture(s) at or below {where}; index holds {index.count()}")
        finally:
            index.close()
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from clipsearch.demo.catalogue import write_catalogue, write_query_picture

    base = Path(args.dir).expanduser() if args.dir else default_home() / "demo"
    images = base / "images"
    try:
        written = write_catalogue(images, count=args.count)
    except OSError as e:
        raise errors.ConfigError(
            f"cannot write the demo catalogue in {images}: {e.strerror or e}; give --dir "
            "or set CLIPSEARCH_HOME to a writable folder"
        ) from None
    print(f"demo catalogue: {written} shape pictures in {images}")
    index_dir = str(base / "index")
    common = ["--index", index_dir]
    status = main(["index", str(images), *common, "--model", "demo"])
    if status:
        return status
    query = "a red circle"
    print(f'\ntext query: "{query}"')
    main(["search", query, "-k", "5", *common])
    query_picture = write_query_picture(base / "query-yellow-star.png")
    print(f"\nimage query: {query_picture} (drawn by a renderer the model never trained on)")
    main(["search", "--image", str(query_picture), "-k", "5", *common])
    print(f'\nTry: clipsearch search "a small green triangle" --index {index_dir}')
    print(f"     clipsearch serve --index {index_dir}")
    return EXIT_OK


def cmd_package_model(args: argparse.Namespace) -> int:
    from clipsearch.sagemaker.packaging import package_model

    packaged = package_model(args.model, args.out)
    print(
        f"wrote {packaged.path} ({packaged.size / 1e6:.1f} MB): {packaged.checkpoint}, code/inference.py, "
        "code/lib (clip, ftfy, regex: no pip install at cold start)"
    )
    print(
        f"template parameters: ModelSpec={packaged.spec} ModelDimension={packaged.dim} "
        f"ModelDataUrl=s3://YOUR-BUCKET/models/{packaged.path.name}"
    )
    return EXIT_OK


def cmd_backfill(args: argparse.Namespace) -> int:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from clipsearch import models
    from clipsearch.aws import backfill

    bucket, prefix = backfill.parse_s3_url(args.url)
    if args.bulk_load and not args.batch_transform:
        raise errors.ConfigError("--bulk-load is for --batch-transform (the queue path writes through the Lambda)")
    opened = contextlib.ExitStack()  # unwound last in, first out: a bulk load's settings go back, then close

    def index_for(dim: int) -> VectorIndex:
        spec = models.canonical_spec(args.model) if args.model else None
        index = _open(args, model=spec, dim=dim if spec else None)
        opened.callback(index.close)  # makes the bulk-loaded documents searchable at once
        opened.enter_context(_loading(args, index))
        return index

    try:
        s3 = boto3.client("s3")
        if not args.batch_transform:
            if not args.queue_url:
                raise errors.ConfigError("give --queue-url (stack output IngestQueueUrl) or set CLIPSEARCH_QUEUE_URL")
            summary = backfill.enqueue(s3, boto3.client("sqs"), args.queue_url, bucket, prefix)
            print(f"queued {summary.sent} of {summary.listed} images under {args.url} for the ingest function")
        else:
            if not args.sagemaker_model:
                raise errors.ConfigError("--batch-transform needs --sagemaker-model (stack output TransformModelName)")
            summary = backfill.batch_transform(
                s3,
                boto3.client("sagemaker"),
                index_for,
                bucket,
                prefix,
                args.sagemaker_model,
                args.instance_type,
                output_url=args.output,
                on_status=lambda status: print(f"transform job: {status}", file=sys.stderr, flush=True),
                batch=_upsert_batch(args),
            )
            print(
                f"indexed {summary.indexed} of {summary.listed} images under {args.url} "
                f"(transform job {summary.job or 'not needed'})"
            )
    except (BotoCoreError, ClientError) as e:
        raise errors.Unavailable(f"AWS call failed: {e}") from None
    finally:
        opened.close()
    for key, reason in summary.failed[:20]:
        print(f"warning: {key}: {reason}", file=sys.stderr)
    return EXIT_FAILED if summary.failed else EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from clipsearch import models

    rows = models.listing()
    if args.json:
        print(json.dumps(rows))
        return EXIT_OK
    for row in rows:
        where = f"cached: {row['path']}" if row["cached"] else "not cached (downloaded on first use)"
        note = "  (default for a new index)" if row["default"] else ""
        if row["spec"] == models.DEMO:
            where, note = "bundled", "  (generated shapes only; `--model demo`)"
        print(f"{row['spec']:<16} {row['dim']:>5}  {where}{note}")
    print(f"cache folder: {models.cache_dir()} (${models.CACHE_ENV}); or --model /path/to/checkpoint.pt")
    return EXIT_OK


def cmd_copy(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from clipsearch.transfer import Rekey, copy_index

    if (args.to_bucket is None) != (args.strip_prefix is None):
        raise errors.BadRequest("--to-bucket and --strip-prefix go together")
    rekey = None
    if args.strip_prefix is not None:
        folder = Path(args.strip_prefix).expanduser()  # resolved as `index` resolves the keys it records
        rekey = Rekey(args.to_bucket, str(folder.resolve() if folder.exists() else folder))
    to = argparse.Namespace(
        backend=args.to_backend, index=args.to_index, opensearch_url=args.to_opensearch_url or args.opensearch_url
    )
    if to.backend == "opensearch" and not to.opensearch_url:
        raise errors.ConfigError("--to-backend opensearch needs --to-opensearch-url (or --opensearch-url)")
    if _where(args) == _where(to):
        raise errors.BadRequest("the source and the destination are the same index")
    source = _open(args, read_only=True)
    try:
        with _writing(to, create=True):
            try:
                dest = _open(to)
            except errors.NotFound:
                dest = _open(to, model=source.model, dim=source.dim)
            bar = tqdm(total=source.count(), unit="doc", desc="copying", file=sys.stderr, disable=None)
            try:
                summary = copy_index(
                    source, dest, rekey=rekey, batch=args.batch_size, rewrite=args.rewrite, on_batch=bar.update
                )
                held = dest.count()
            finally:
                bar.close()
                dest.close()
    finally:
        source.close()
    if rekey is not None and summary.outside:
        print(
            f"warning: left out {summary.outside} documents not under {shown(rekey.strip_prefix)}, "
            f"e.g. {shown(summary.outside_example)}",
            file=sys.stderr,
        )
    for id_, reason in list(summary.failed.items())[:20]:
        print(f"warning: {id_}: {reason}", file=sys.stderr)
    print(
        f"copied {summary.copied}, unchanged {summary.unchanged}, failed {len(summary.failed)} of "
        f"{summary.read} documents in {summary.seconds:.1f}s ({summary.docs_per_second:.0f} docs/s); "
        f"the destination holds {held}"
    )
    return EXIT_FAILED if summary.failed else EXIT_OK


def _where(args: argparse.Namespace) -> tuple[str, str]:
    """Which index a backend, index and URL name, to tell a copy onto itself."""
    if args.backend == "embedded":
        return "embedded", str((Path(args.index).expanduser() if args.index else default_home() / "index").resolve())
    return args.opensearch_url or "", args.index or "clipsearch"


COMMANDS = {
    "index": cmd_index,
    "search": cmd_search,
    "duplicates": cmd_duplicates,
    "stats": cmd_stats,
    "serve": cmd_serve,
    "check": cmd_check,
    "forget": cmd_forget,
    "reindex": cmd_reindex,
    "demo": cmd_demo,
    "package-model": cmd_package_model,
    "backfill": cmd_backfill,
    "models": cmd_models,
    "copy": cmd_copy,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (typed errors become one stderr line)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USAGE_ERRORS as e:
        print(f"clipsearch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except errors.ClipsearchError as e:
        print(f"clipsearch: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("clipsearch: interrupted; committed work is kept, re-run to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


def run() -> None:
    """Console-script entry point."""
    status = main()
    if status == EXIT_INTERRUPTED:
        # The first Ctrl-C ends the process now: a decoding thread stuck in a read (a hung network
        # share) would otherwise keep it alive at exit. Every committed batch is already on disk.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
