"""Where a site's users come from: a simulated partition, or the site's own file.

Loading, partitioning and each site's training examples are cached per process: a simulation's site processes and
a deployed site's warm runtime (``client.runtime``) serve many rounds, and re-reading data every round would dominate
a small round's time (a ``noise = central`` round is one step). A deployed site's cache is keyed by its files'
fingerprints (size, modification time, inode), so a site that edits its data or receives a new catalogue trains on
the new files from the next round on, without restarting. The cached tensors are never modified by training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.data.catalog import Catalog
from common.data.datasets import load_dataset
from common.data.partition import partition_users, user_site_names
from common.data.split import TrainingExamples, training_examples
from common.errors import DataError
from common.utils.progress import log


@dataclass(frozen=True)
class SiteShard:
    catalog: Catalog
    examples: TrainingExamples


@lru_cache(maxsize=4)
def _federation(
    spec: str, kcore: int, scheme: str, seed: int, num_sites: int, catalog_path: str = ""
) -> tuple[Catalog, list[np.ndarray], np.ndarray]:
    dataset = load_dataset(spec, kcore=kcore)
    if catalog_path:  # a lifelong window: the catalogue grows across runs, so it is given, not built from the data
        catalog = Catalog.load(Path(catalog_path))
        dataset, _ = dataset.restricted_to(catalog)
    else:
        catalog = dataset.catalog()
    user_ids, sequences = dataset.sequences(catalog)
    sites = partition_users(
        sequences, num_sites, scheme, seed, catalog.num_items, user_site_names(dataset.frame, user_ids)
    )
    return catalog, sequences, sites


@lru_cache(maxsize=32)
def simulated_shard(
    spec: str, kcore: int, scheme: str, seed: int, partition_id: int, num_partitions: int, max_len: int,
    catalog_path: str = "",
) -> SiteShard:
    """The users of one simulated site; the catalogue is built from the whole dataset (as the report says), or is
    the one the site's node config names."""
    catalog, sequences, sites = _federation(spec, kcore, scheme, seed, num_partitions, catalog_path)
    mine = [sequences[user] for user in np.flatnonzero(sites == partition_id)]
    return SiteShard(catalog, training_examples(mine, max_len))


def simulated_partition_sha256(
    spec: str, kcore: int, scheme: str, seed: int, num_partitions: int, catalog_path: str = ""
) -> str:
    """Who is at which simulated site, as one hash: the catalogue, then every user's site and history in order.

    The run record pins it, so that a resume whose settings all match but whose data changed under the same
    spec (an edited file) is refused: a user moved to another site would carry the spend of both.
    """
    catalog, sequences, sites = _federation(spec, kcore, scheme, seed, num_partitions, catalog_path)
    digest = hashlib.sha256(catalog.fingerprint().encode("utf-8"))
    for site, sequence in zip(sites, sequences, strict=True):
        digest.update(np.array([site, len(sequence)], dtype=np.int64).tobytes())
        digest.update(np.asarray(sequence, dtype=np.int64).tobytes())
    return digest.hexdigest()


def deployed_shard(data_path: str, catalog_path: str, max_len: int) -> SiteShard:
    """The site's own interaction file, mapped onto the public catalogue; unknown items are dropped and counted.

    An empty file, or one of a single user, is a site like any other: it trains, and its release is DP whatever its
    users (pure noise for none). An error for it would tell the coordinator the count, and the user's id.
    """
    if not catalog_path:
        raise DataError("node config 'catalog-path' is required in a deployment (the public product list)")
    return _deployed_shard(data_path, catalog_path, max_len, _file_version(data_path), _file_version(catalog_path))


def _file_version(path: str) -> tuple[int, int, int]:
    """What changes when a file is replaced or edited: size, modification time (ns) and inode; (0, 0, 0) if absent
    (the loader then says what is missing)."""
    try:
        status = Path(path).stat()
    except OSError:
        return (0, 0, 0)
    return (status.st_size, status.st_mtime_ns, status.st_ino)


@lru_cache(maxsize=2)
def _deployed_shard(
    data_path: str, catalog_path: str, max_len: int, data_version: tuple[int, int, int],
    catalog_version: tuple[int, int, int],
) -> SiteShard:
    """``data_version``, ``catalog_version``: only in the cache key, so that a changed file is read again."""
    catalog = Catalog.load(Path(catalog_path))
    dataset, unknown = load_dataset(data_path, allow_few_users=True).restricted_to(catalog, allow_empty=True)
    if unknown:
        log(f"site data: {unknown} interactions name items outside the public catalogue; ignored")
    _, sequences = dataset.sequences(catalog)
    examples = training_examples(sequences, max_len)
    if len(examples) < 2:
        log(f"site data: {len(examples)} users with a training example; the site trains all the same (its releases "
            "stay DP, with no users pure noise)")
    return SiteShard(catalog, examples)
