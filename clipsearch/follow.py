"""A long-running server follows a reindex: it notices that its index name leads to another physical index,
loads that index's model in the background, then swaps model and index together (SearchService.swap).

Until the new pair is ready every request is answered by the old one, so a switch costs no request; as the
pair is swapped by one assignment, no request encodes with one model and searches the other's vectors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from clipsearch.encoders import Encoder
from clipsearch.errors import ClipsearchError
from clipsearch.index.base import VectorIndex
from clipsearch.search import SearchService

__all__ = ["Follower"]

# How often a request may look at the alias or the pointer file: cheap, and a switch is seen within it.
CHECK_EVERY_S = 2.0


class Follower:
    """SearchService's follow hook. where(): which physical index the name leads to now (a pointer's content,
    an alias's index); reopen(): open the index by its name; encoder_for(model): load that model."""

    def __init__(
        self,
        where: Callable[[], str],
        reopen: Callable[[], VectorIndex],
        encoder_for: Callable[[str], Encoder],
        log: Callable[[str], None] = lambda line: None,
        every_s: float = CHECK_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.where, self.reopen, self.encoder_for, self.log = where, reopen, encoder_for, log
        self.every_s, self.clock = every_s, clock
        self.seen = where()
        self._next = clock() + every_s
        self._lock = threading.Lock()
        self._loading: threading.Thread | None = None

    def __call__(self, service: SearchService, moved: bool = False) -> None:
        """Look (at most every every_s) whether the name moved, and load the new pair in the background.

        moved: the index itself reported that it reads another model's vectors now (a plain OpenSearch index
        whose name became an alias): the request waits for the new pair instead.
        """
        with self._lock:
            now = self.clock()
            if self._loading is None and (moved or now >= self._next):
                self._next = now + self.every_s
                try:
                    where = self.where()
                except ClipsearchError as e:  # the node is briefly away: keep answering with what is open
                    self.log(f"warning: cannot tell which index to serve: {e}")
                    return
                if where != self.seen or moved:
                    # Loading a model takes seconds: off the request path, which keeps the old pair meanwhile.
                    self._loading = threading.Thread(target=self._load, args=(service, where), daemon=True)
                    self._loading.start()
            loading = self._loading
        if moved and loading is not None:
            loading.join()

    def _load(self, service: SearchService, where: str) -> None:
        try:
            index = self.reopen()
            # swap checks the index's recorded model against the encoder's, so two models of the same
            # dimension can never mix silently.
            service.swap(self.encoder_for(index.model), index)
            self.seen = where
            self.log(f"now serving {index.count()} images ({index.model}) from {where}")
            # The old index is not closed: requests still running hold it, and it goes with their references.
        except ClipsearchError as e:
            self.log(
                f"warning: the index now leads to {where}, which cannot be served yet ({e}); still serving the old one"
            )
        finally:
            with self._lock:
                self._loading = None
