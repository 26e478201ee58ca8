"""Opt-in approximate search for the embedded index: FAISS IVF lists of compact codes, re-ranked exactly.

The structure is a cache over the in-memory matrix, which is itself loaded from SQLite (the source of
truth): it can always be rebuilt from there. A copy persisted beside the database is used only when its
header matches the database's write generation, the row count and the order of the ids, so a crash or
a write by another process costs a rebuild, never a wrong answer.

How it stays fast: the codes are 4-bit product-quantisation codes scanned with FAISS's in-register
"fast scan" (dim/16 bytes per vector, 64 B at dim 1024), so visiting many lists is cheap; the few
hundred best candidates are then re-scored with the float32 vectors, so every returned score is exact.
How it stays accurate: the number of lists visited (nprobe) is calibrated when the structure is built,
on sample rows used as queries, until recall@10 against the exact scan reaches `target_recall`. When
that takes every list (data without cluster structure, e.g. uniform random vectors), the structure
cannot beat a scan and the index answers exactly instead (`useful` is False).
faiss is imported lazily: only this mode needs it (`pip install faiss-cpu`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.errors import ConfigError

FORMAT = 1
FILE_NAME = "ann-ivf.bin"
MAGIC = b"clipsearch-ann\x00\x01"
# Above this many lists (over a million rows with the default list size) the coarse quantizer is an
# HNSW graph: a flat scan of 4096 centroids of dim 1024 alone takes ~1 ms per query.
HNSW_QUANTIZER_LISTS = 1024


@dataclass(frozen=True)
class AnnOptions:
    """Knobs of the approximate mode (pass them as a dict: EmbeddedIndex(..., ann={...}))."""

    min_rows: int = 50_000  # below this an exact scan is already fast, so approx mode answers exactly
    # Calibrated on sample rows; fresh queries measured ~1 point lower at 1M, hence the margin over 0.98.
    target_recall: float = 0.99
    # Average vectors per IVF list. Long lists are cheap with fast-scan codes, and fewer lists keep the
    # coarse search small: at 1M x 1024, 976 lists beat 3906 (measured 2.3 vs 2.7 ms at recall ~0.985).
    list_size: int = 1024
    rerank: int = 300  # candidates re-scored exactly for k=10 (scaled up for larger k + from)
    train_per_list: int = 24  # k-means sample size per list
    train_iterations: int = 8
    calibration_queries: int = 200
    codes: str = "pq4"  # "pq4": 4-bit PQ fast scan, dim/16 bytes; "sq8": 1 byte per dimension
    seed: int = 0
    persist: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> AnnOptions:
        """Options from a plain dict (open_index(..., ann={...})); unknown names are refused."""
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown approximate-search option(s): {', '.join(unknown)}")
        return cls(**values)


@dataclass
class AnnHeader:
    """What a persisted structure was built from; it is reused only when all of it still matches."""

    generation: int
    count: int
    dim: int
    ids_digest: str
    nprobe: int = 0
    rerank: int = 0
    trained_count: int = 0
    format: int = FORMAT
    options: dict[str, Any] = field(default_factory=dict)

    def matches(self, other: AnnHeader) -> bool:
        return (self.format, self.generation, self.count, self.dim, self.ids_digest, self.options) == (
            other.format,
            other.generation,
            other.count,
            other.dim,
            other.ids_digest,
            other.options,
        )


def ids_digest(ids: Sequence[str]) -> str:
    """A digest of the row order: the structure addresses vectors by matrix row."""
    h = hashlib.sha1()
    for start in range(0, len(ids), 65536):
        h.update("\n".join(ids[start : start + 65536]).encode())
        h.update(b"\n")
    return h.hexdigest()


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError("approximate search needs faiss: pip install faiss-cpu") from None
    return faiss


# FAISS's fast-scan search variant that splits one query's lists across the OpenMP threads and collects
# candidates in a reservoir (implem 15); the default one scans a single query's lists on one thread.
# Same candidates; 0.3-0.4 ms less per query at 1M x 1024 on 2 cores (bench/index_search.py, same runs).
PARALLEL_SCAN = 15


class AnnIndex:
    """IVF lists of compact codes, addressed by matrix row, with an exact re-rank."""

    def __init__(self, index: Any, nprobe: int, options: AnnOptions, trained_count: int, rerank: int = 0) -> None:
        self.index = index
        if hasattr(index, "implem"):  # fast-scan codes
            index.implem = PARALLEL_SCAN
        self.nprobe = nprobe
        self.rerank = rerank or options.rerank  # candidates re-scored exactly for k=10
        self.options = options
        self.trained_count = trained_count  # rows the lists were trained on

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def build(cls, matrix: np.ndarray, options: AnnOptions) -> AnnIndex:
        """Train lists on a sample of the rows, add every row, then calibrate nprobe."""
        faiss = _faiss()
        n, dim = matrix.shape
        nlist = max(1, min(n // options.list_size, 65536))
        rng = np.random.default_rng(options.seed)
        sample = matrix[np.sort(rng.choice(n, min(n, nlist * options.train_per_list), replace=False))]
        kmeans = faiss.Kmeans(
            dim,
            nlist,
            niter=options.train_iterations,
            spherical=True,
            seed=options.seed,
            max_points_per_centroid=options.train_per_list,
            min_points_per_centroid=1,
        )
        kmeans.train(sample)
        if nlist > HNSW_QUANTIZER_LISTS:
            quantizer = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efConstruction = 80
        else:
            quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(kmeans.centroids)
        if options.codes == "pq4" and dim % 8 == 0:
            index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, dim // 8, 4, faiss.METRIC_INNER_PRODUCT)
        elif options.codes in ("pq4", "sq8"):
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
            )
        else:
            raise ConfigError(f"unknown code type {options.codes!r}; use pq4 or sq8")
        index.train(sample)  # the quantizer is already trained: this fits the codes only
        index.add(np.ascontiguousarray(matrix))
        ann = cls(index, 1, options, n)
        ann.calibrate(matrix)
        return ann

    def calibrate(self, matrix: np.ndarray, k: int = 10) -> None:
        """Set nprobe, then the re-rank depth, to the smallest values whose recall@k on sample rows (used as
        queries, themselves excluded) reaches the target. Past every list, a deeper re-rank always gets there."""
        faiss = _faiss()
        n = matrix.shape[0]
        rng = np.random.default_rng(self.options.seed + 1)
        rows = rng.choice(n, min(n, self.options.calibration_queries), replace=False)
        queries = np.ascontiguousarray(matrix[rows])
        _, truth = faiss.knn(queries, matrix, min(n, k + 1), faiss.METRIC_INNER_PRODUCT)
        expected = [{int(r) for r in t if r != row} for row, t in zip(rows, truth, strict=True)]
        needed = self.options.target_recall * sum(min(k, len(e)) for e in expected)

        def reached() -> bool:
            found = 0
            for q, row, want in zip(queries, rows, expected, strict=True):
                got, _ = self.search(q, k + 1, matrix)
                found += len(want & {int(r) for r in got if r != row})
            return found >= needed

        # Lists first, with a deep re-rank so that the codes' coarseness does not blur the count.
        self.nprobe, self.rerank = 1, 4 * self.options.rerank
        while not reached() and self.nprobe < self.nlist:
            self.nprobe = min(self.nlist, max(self.nprobe + 1, self.nprobe * 3 // 2))  # steps of 1.5x
        self.rerank = self.options.rerank
        while not reached() and self.rerank < n:
            self.rerank *= 2
        # Doubling overshoots by up to 2x, and each re-ranked candidate is a random 4*dim-byte read: bisect
        # between the last depth that failed and the first that passed (recall only grows with depth).
        low, high = self.rerank // 2, self.rerank
        if high > self.options.rerank:
            while high - low > max(16, high // 16):
                self.rerank = (low + high) // 2
                low, high = (low, self.rerank) if reached() else (self.rerank, high)
            self.rerank = high

    @property
    def useful(self) -> bool:
        """Whether the lists prune anything at the calibrated recall (else an exact scan is as good)."""
        return self.nprobe < self.nlist

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def reset(self, matrix: np.ndarray) -> None:
        """Re-add every row after the rows were renumbered (a delete), keeping lists and calibration."""
        self.index.reset()
        self.index.add(np.ascontiguousarray(matrix))

    def append(self, vectors: np.ndarray, start: int) -> None:
        """Add rows start .. start + len(vectors) of the matrix."""
        ids = np.arange(start, start + len(vectors), dtype=np.int64)
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)

    def replace(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Rows whose vector changed in place."""
        faiss = _faiss()
        ids = np.asarray(rows, dtype=np.int64)
        self.index.remove_ids(faiss.IDSelectorBatch(ids))
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)

    # -- searching ---------------------------------------------------------------------------

    def search(
        self, q: np.ndarray, want: int, matrix: np.ndarray, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to `want` (row, exact score) pairs, best first; `allowed` is an optional boolean row mask."""
        faiss = _faiss()
        probe = self.nprobe
        params = faiss.SearchParametersIVF()
        if allowed is not None:
            # A filter removes candidates from the visited lists, so visit proportionally more lists.
            share = max(float(allowed.mean()), 1e-9)
            probe = min(self.nlist, int(np.ceil(probe / share)))
            bitmap = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
            params.sel = selector  # raw pointers into `bitmap`: the locals keep it alive meanwhile
        params.nprobe = probe
        if self.nlist > HNSW_QUANTIZER_LISTS:
            graph = faiss.SearchParametersHNSW(efSearch=max(32, 2 * probe))
            params.quantizer_params = graph
        fetch = min(self.count, max(self.rerank, want * self.rerank // 10))
        _, labels = self.index.search(q[None, :], fetch, params=params)
        rows = np.sort(labels[0][labels[0] >= 0])  # ascending rows: fewer pages touched when gathering
        # einsum, not `@`: BLAS hands a block this small to a second thread, and waking it cost ~8 ms
        # per query on a busy machine (0.8 ms single-threaded).
        scores = np.einsum("ij,j->i", matrix[rows], q)
        order = np.argsort(-scores, kind="stable")[:want]
        return rows[order], scores[order]

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: Path, header: AnnHeader) -> None:
        """Write header and structure as one file, atomically (temp file + rename)."""
        faiss = _faiss()
        header.nprobe, header.rerank, header.trained_count = self.nprobe, self.rerank, self.trained_count
        data = faiss.serialize_index(self.index)
        head = json.dumps(asdict(header)).encode()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(head)))
            f.write(head)
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, expected: AnnHeader, options: AnnOptions) -> AnnIndex | None:
        """The persisted structure when its header matches `expected`, else None (rebuild)."""
        faiss = _faiss()
        try:
            with open(path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    return None
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 1 << 20:
                    return None
                header = AnnHeader(**json.loads(f.read(size)))
                if not header.matches(expected):
                    return None
                data = np.frombuffer(f.read(), dtype=np.uint8)
            index = faiss.deserialize_index(data)
        except (OSError, ValueError, TypeError, struct.error, RuntimeError):
            return None
        return cls(index, header.nprobe, options, header.trained_count, header.rerank)

    def info(self) -> dict[str, Any]:
        faiss = _faiss()
        kind = "pq4" if isinstance(self.index, faiss.IndexIVFPQFastScan) else "sq8"
        return {
            "ann": "ivf-" + kind,
            "ann_lists": self.nlist,
            "ann_nprobe": self.nprobe,
            "ann_rerank": self.rerank,
            "ann_useful": self.useful,
            "ann_bytes_per_vector": int(self.index.code_size) + 8,
        }  # codes + the int64 id in its list
