"""Hot reload for ``fedtail serve``: a new model in the run folder is served without a restart or a failed request.

A served version is one ``Recommender``: a model together with the catalogue it was trained on (the model file
records the catalogue's fingerprint and loading checks it), its content vectors and its run summary. Reloading
builds a whole new ``Recommender`` beside the one serving and then swaps one reference; a request reads that
reference once and computes its whole answer with the version it got, so no answer mixes two versions, and the
old version stays alive until the requests holding it have finished.

Two triggers (``fedtail serve --watch-interval``, ``POST /admin/reload``):

- a watcher thread polls the identity (inode, size, modification time) of the files a version is read from. The
  server writes each of them atomically (temporary file + rename), but a model and its catalogue are two files,
  so a change is loaded only once the files have stayed unchanged for one whole poll interval: a model whose new
  catalogue has not been written yet is not even tried;
- an explicit reload request loads at once.

A load reads a consistent snapshot: the files' identities are taken before and after the read, and a read during
which any of them was replaced is discarded and retried. A reload that fails (a corrupt file, a model whose
catalogue does not match, a missing file) keeps the old version serving and logs one line naming the file; the
watcher does not retry the same files until they change again.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import DataError
from common.recommender.artifacts import CATALOG_FILE, MODEL_FILE
from common.recommender.augment import AugmentOptions
from common.recommender.content import ITEM_VECTORS_FILE
from common.recommender.ranking import RankingOptions
from common.recommender.rerank import DiversityOptions
from common.run_files import GLOBAL_MODEL_FILE, SUMMARY_FILE
from common.utils.progress import log
from server.serving import Recommender

VERSION_FILES = (GLOBAL_MODEL_FILE, MODEL_FILE, CATALOG_FILE, ITEM_VECTORS_FILE, SUMMARY_FILE)
"""Every file ``Recommender.load`` may read: a change to any of them is a new version to load."""
SNAPSHOT_TRIES = 3

FileIdentity = tuple[int, int, int, int] | None
"""(device, inode, size, modification time in ns) of a file, None when it is absent."""
FolderState = tuple[FileIdentity, ...]


def folder_state(run_dir: Path) -> FolderState:
    """The identities of ``VERSION_FILES``: an atomic rename gives a file a new inode, so any rewrite changes this."""
    identities: list[FileIdentity] = []
    for name in VERSION_FILES:
        try:
            status = os.stat(run_dir / name)
        except FileNotFoundError:
            identities.append(None)
            continue
        identities.append((status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns))
    return tuple(identities)


class ReloadError(Exception):
    """A reload failed; the version that was serving still serves."""


@dataclass(frozen=True)
class ReloadResult:
    reloaded: bool
    """False when the files had not changed since the serving version was loaded."""
    served: Recommender


class LiveRecommender:
    """The version being served (``current``), replaced whole by ``reload``."""

    def __init__(
        self, run_dir: str | Path, device: torch.device | None, ranking: RankingOptions,
        diversity: DiversityOptions = DiversityOptions(), augmentation: AugmentOptions = AugmentOptions(),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.device = device
        self.ranking = ranking
        self.diversity = diversity
        self.augmentation = augmentation
        self._lock = threading.Lock()  # one reload at a time: the watcher's and an explicit request's
        self._current, self._state = self._load()
        self._failed_state: FolderState | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def current(self) -> Recommender:
        """The version to answer one request with: read it once per request, never per step."""
        return self._current

    def reload(self) -> ReloadResult:
        """Load the run folder's files if they changed since the serving version was loaded, then swap."""
        with self._lock:
            attempted = folder_state(self.run_dir)
            if attempted == self._state:
                return ReloadResult(False, self._current)
            old = self._current.info
            try:
                recommender, state = self._load()
            except Exception as error:  # any failure (a DataError on a file, or worse) must leave the old serving
                self._failed_state = attempted
                message = (f"fedtail: reload of {self.run_dir} failed, still serving model {old.model_id} "
                           f"(catalogue {old.catalog_sha256}): {error}")
                log(message)
                raise ReloadError(message) from error
            self._current, self._state, self._failed_state = recommender, state, None
            new = recommender.info
            log(f"fedtail: reloaded {self.run_dir}: model {old.model_id} -> {new.model_id}, catalogue "
                f"{old.catalog_sha256} ({old.catalog_size} items) -> {new.catalog_sha256} ({new.catalog_size} items)")
            return ReloadResult(True, recommender)

    def _load(self) -> tuple[Recommender, FolderState]:
        """A version read from files none of which was replaced during the read."""
        for _ in range(SNAPSHOT_TRIES):
            before = folder_state(self.run_dir)
            recommender = Recommender.load(self.run_dir, self.device, self.ranking, self.diversity, self.augmentation)
            if folder_state(self.run_dir) == before:
                return recommender, before
        raise DataError(f"its files were replaced during each of {SNAPSHOT_TRIES} reads; try again", self.run_dir)

    def watch(self, interval: float) -> None:
        """Poll the run folder every ``interval`` seconds in a daemon thread, reloading files that have settled."""
        self._watcher = threading.Thread(target=self._poll, args=(interval,), name="fedtail-reload", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()

    def _poll(self, interval: float) -> None:
        seen = self._state
        while not self._stop.wait(interval):
            state = folder_state(self.run_dir)
            settled, seen = state == seen, state
            if settled and state not in (self._state, self._failed_state):
                try:
                    self.reload()
                except ReloadError:
                    pass  # logged by reload; the same files are not tried again until they change
