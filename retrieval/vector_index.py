"""The in-memory vector index of a connector's chunk embeddings.

Each process keeps one index per recently searched connector: a float32
matrix of L2-normalised embeddings, one row per embedded chunk, so cosine
similarity is one matrix-vector product. An index is built lazily from the
database and rebuilt when the connector's `index_version` changes, and only
MAX_CACHED_INDEXES connectors are kept, least recently used dropped first.
"""

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .models import Chunk
from .search_errors import SearchUnavailable

logger = logging.getLogger(__name__)

# At 256 dimensions an index takes about 1 KB per chunk, so four connectors of
# 100,000 chunks hold about 400 MB per process.
MAX_CACHED_INDEXES = 4
# Rows read from the database per round trip while building.
BUILD_BATCH_SIZE = 2000


@dataclass
class VectorIndex:
    """Normalised embeddings of one connector's chunks at one index_version.

    Rows are in (resource id, chunk position) order, so a row number breaks
    ties between equal similarities the same way keyword search does.
    """

    connector_id: object
    index_version: int
    matrix: np.ndarray  # shape (chunks, dimensions), float32, rows of norm 1
    chunk_ids: list
    resource_ids: list
    positions: list

    @property
    def dimensions(self):
        return self.matrix.shape[1]

    def __len__(self):
        return self.matrix.shape[0]

    def nearest(self, query_vector, depth):
        """Return `(rows, similarities)` of the `depth` most similar chunks.

        Best first; equal similarities are ordered by row. Raises
        SearchUnavailable when the query has the wrong length, is zero or is
        not finite.
        """
        query = normalised_query(query_vector)
        if len(self) == 0:
            return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.float32)
        if query.shape[0] != self.dimensions:
            raise SearchUnavailable(
                "VECTOR_DIMENSION_MISMATCH",
                f"query_vector has {query.shape[0]} dimensions, but this "
                f"connector's chunks are embedded with {self.dimensions}. Embed "
                "the query with the model used for the chunks.",
            )
        similarities = self.matrix @ query
        rows = top_rows(similarities, depth)
        return rows, similarities[rows]


def normalised_query(query_vector):
    """Return `query_vector` as a float32 unit vector, or raise SearchUnavailable."""
    try:
        query = np.asarray(query_vector, dtype=np.float64)
    except (TypeError, ValueError):
        query = None
    if query is None or query.ndim != 1 or query.shape[0] == 0:
        raise SearchUnavailable(
            "INVALID_QUERY_VECTOR", "query_vector must be a non-empty list of numbers."
        )
    norm = np.linalg.norm(query)
    if not np.isfinite(norm) or norm == 0:
        raise SearchUnavailable(
            "INVALID_QUERY_VECTOR",
            "query_vector must contain only finite numbers and must not be all zero.",
        )
    return (query / norm).astype(np.float32)


def top_rows(scores, depth):
    """Return the rows of the `depth` highest scores, best first.

    Ties are ordered by row, also at the cut, where the lowest of the rows
    that share the lowest kept score are kept. np.argpartition alone would
    pick among them arbitrarily.
    """
    count = scores.shape[0]
    if depth <= 0:
        return np.empty(0, dtype=np.intp)
    if depth < count:
        partitioned = np.argpartition(-scores, depth - 1)[:depth]
        cut = scores[partitioned].min()
        above = np.flatnonzero(scores > cut)
        at_cut = np.flatnonzero(scores == cut)[: depth - above.shape[0]]
        rows = np.sort(np.concatenate([above, at_cut]))
    else:
        rows = np.arange(count)
    # A stable sort on ascending rows keeps equal scores in row order.
    return rows[np.argsort(-scores[rows], kind="stable")]


def build_index(connector):
    """Read the connector's embedded chunks and return their VectorIndex.

    Chunks without an embedding, or with a zero or non-finite one, are left
    out. If embeddings of several lengths are stored (after a change of
    model), only the most common length is indexed and the rest is logged.
    """
    index_version = connector.index_version
    by_length = {}
    rows = (
        Chunk.objects.filter(resource__connector_id=connector.pk)
        .exclude(embedding=b"")
        .order_by("resource_id", "position")
        .values_list("id", "resource_id", "position", "embedding")
        .iterator(chunk_size=BUILD_BATCH_SIZE)
    )
    for chunk_id, resource_id, position, embedding in rows:
        embedding = bytes(embedding)
        if not embedding or len(embedding) % 4:
            continue
        group = by_length.setdefault(len(embedding), ([], [], [], bytearray()))
        group[0].append(chunk_id)
        group[1].append(resource_id)
        group[2].append(position)
        group[3].extend(embedding)

    if not by_length:
        return VectorIndex(
            connector.pk, index_version, np.empty((0, 0), np.float32), [], [], []
        )
    # Most rows first, then the shorter length, so the choice is deterministic.
    length = min(by_length, key=lambda size: (-len(by_length[size][0]), size))
    skipped = sum(len(group[0]) for size, group in by_length.items() if size != length)
    if skipped:
        logger.warning(
            "Connector %s: %d chunk embeddings have another length than the %d "
            "indexed ones and are left out of vector search",
            connector.pk,
            skipped,
            len(by_length[length][0]),
        )
    chunk_ids, resource_ids, positions, raw = by_length.pop(length)
    by_length.clear()
    # A bytearray is writable, so the matrix is normalised in place.
    matrix = np.frombuffer(raw, dtype="<f4").reshape(-1, length // 4)
    norms = np.linalg.norm(matrix, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    if not usable.all():
        keep = np.flatnonzero(usable)
        matrix = matrix[keep]
        norms = norms[keep]
        chunk_ids = [chunk_ids[row] for row in keep]
        resource_ids = [resource_ids[row] for row in keep]
        positions = [positions[row] for row in keep]
    matrix /= norms[:, None]
    return VectorIndex(
        connector.pk, index_version, matrix, chunk_ids, resource_ids, positions
    )


class IndexCache:
    """Least-recently-used VectorIndex per connector, safe across threads."""

    def __init__(self, max_entries=MAX_CACHED_INDEXES):
        self.max_entries = max_entries
        self._indexes = OrderedDict()
        self._lock = threading.Lock()
        # One lock per connector, so two requests build an index once, while
        # searches of other connectors go on.
        self._build_locks = {}

    def get(self, connector):
        """Return the connector's index at its index_version, building it if needed."""
        index = self._cached(connector)
        if index is not None:
            return index
        with self._lock:
            build_lock = self._build_locks.setdefault(connector.pk, threading.Lock())
        with build_lock:
            index = self._cached(connector)
            if index is None:
                index = build_index(connector)
                logger.info(
                    "Built the vector index of connector %s at version %s: %d chunks",
                    connector.pk,
                    connector.index_version,
                    len(index),
                )
                self._store(index)
        return index

    def forget(self, connector_id):
        with self._lock:
            self._indexes.pop(connector_id, None)
            self._build_locks.pop(connector_id, None)

    def clear(self):
        with self._lock:
            self._indexes.clear()
            self._build_locks.clear()

    def _cached(self, connector):
        with self._lock:
            index = self._indexes.get(connector.pk)
            # An index newer than the caller's connector row is still current.
            if index is None or index.index_version < connector.index_version:
                return None
            self._indexes.move_to_end(connector.pk)
            return index

    def _store(self, index):
        with self._lock:
            self._indexes[index.connector_id] = index
            self._indexes.move_to_end(index.connector_id)
            while len(self._indexes) > self.max_entries:
                evicted, _ = self._indexes.popitem(last=False)
                self._build_locks.pop(evicted, None)


index_cache = IndexCache()
