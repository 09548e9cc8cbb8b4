"""Keyword ranking with the database's own full-text index.

Migration 0003_fulltext builds the index: an FTS5 table on SQLite and a
tsvector column with a GIN index on PostgreSQL. The user's text never reaches
SQL as syntax. It is reduced to words of letters and digits, and those words
are quoted into a full-text query that is passed as a parameter.
"""

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from django.db import connection

from .models import Chunk, Resource
from .search_errors import SearchUnavailable

STOPWORDS = frozenset(
    "a an and are as at be but by can do does for from had has have how i in is it "
    "its me my of on or our should so that the their them there these they this to "
    "us was we what when where which who why will with you your".split()
)
# Letters and digits in any script, so "café" is one word. [^\W_] is \w
# without the underscore.
WORD = re.compile(r"[^\W_]+")
# Bounds the size of the OR query that a long pasted text would make.
MAX_QUERY_TERMS = 32

# Two ways to rank, per database. The joined query joins every match to its
# resource to filter by connector. The index-wide query ranks the best
# matches of all connectors without joins, then marks the connector's rows.
# With one connector of 20,000 or 100,000 chunks (bench/retrieval.py corpus,
# SQLite) it took a third to a half of the joined query's time.
SQLITE_INDEX_WIDE = """
    WITH best AS (
        SELECT rowid AS chunk_rowid, -bm25(retrieval_chunk_fts) AS score
        FROM retrieval_chunk_fts
        WHERE retrieval_chunk_fts MATCH %(match)s
        ORDER BY score DESC
        LIMIT %(limit)s
    )
    SELECT chunk.id, chunk.resource_id, chunk.position, best.score,
           resource.connector_id = %(connector)s
    FROM best
    JOIN retrieval_chunk AS chunk ON chunk.rowid = best.chunk_rowid
    JOIN retrieval_resource AS resource ON resource.id = chunk.resource_id
"""
SQLITE_JOINED = """
    SELECT chunk.id, chunk.resource_id, chunk.position,
           -bm25(retrieval_chunk_fts) AS score, 1
    FROM retrieval_chunk_fts
    JOIN retrieval_chunk AS chunk ON chunk.rowid = retrieval_chunk_fts.rowid
    JOIN retrieval_resource AS resource ON resource.id = chunk.resource_id
    WHERE retrieval_chunk_fts MATCH %(match)s
      AND resource.connector_id = %(connector)s
    ORDER BY score DESC, chunk.resource_id, chunk.position
    LIMIT %(limit)s
"""
# NOTE: ts_rank_cd is cover density ranking, not BM25. It counts how often
# and how close together the query's words occur, but it has no inverse
# document frequency, so a rare word weighs no more than a common one.
# Normalisation 1 divides by 1 + log(length), so long chunks do not win on
# length alone, as BM25's length normalisation intends.
POSTGRESQL_INDEX_WIDE = """
    SELECT best.id, best.resource_id, best.position, best.score,
           resource.connector_id = %(connector)s
    FROM (
        SELECT id, resource_id, position,
               ts_rank_cd(search_vector, to_tsquery('english', %(match)s), 1) AS score
        FROM retrieval_chunk
        WHERE search_vector @@ to_tsquery('english', %(match)s)
        ORDER BY score DESC
        LIMIT %(limit)s
    ) AS best
    JOIN retrieval_resource AS resource ON resource.id = best.resource_id
"""
POSTGRESQL_JOINED = """
    SELECT chunk.id, chunk.resource_id, chunk.position,
           ts_rank_cd(chunk.search_vector, to_tsquery('english', %(match)s), 1)
               AS score,
           true
    FROM retrieval_chunk AS chunk
    JOIN retrieval_resource AS resource ON resource.id = chunk.resource_id
    WHERE chunk.search_vector @@ to_tsquery('english', %(match)s)
      AND resource.connector_id = %(connector)s
    ORDER BY score DESC, chunk.resource_id, chunk.position
    LIMIT %(limit)s
"""
# Query words that occur in more than this share of the indexed chunks are
# dropped from the query while a rarer word remains, as search engines prune
# very common words. Such a word adds little to a ranking, because BM25 gives
# it a low inverse document frequency, yet the database scores every chunk
# that contains it, so its cost grows with the size of the index.
COMMON_TERM_SHARE = 0.05
# A word is common only in more chunks than this as well, so that small
# indexes, where scoring every match costs little, keep every word.
MIN_COMMON_TERM_DOCUMENTS = 100
# When every word of a query is common, only the rarest is kept. To find it,
# document counts go up to this many times the common-word threshold, and
# words past that bound tie and are taken in alphabetical order.
RAREST_TERM_COUNT_FACTOR = 8
# Counts of chunks and of (word, bound) matches per (connector id, index
# version), kept in this process and bounded like an LRU.
MAX_REMEMBERED_COUNTS = 65536
# Document counts stop at a bound, so a common word costs no more than the
# bound in index rows. They cover the whole index, not one connector,
# because the ranking queries read a word's matches in every connector too.
SQLITE_BOUNDED_TERM_COUNT = """
    SELECT count(*) FROM (
        SELECT 1 FROM retrieval_chunk_fts
        WHERE retrieval_chunk_fts MATCH %(match)s
        LIMIT %(limit)s
    )
"""
# On PostgreSQL a bounded count reads each match's table row, which took
# tens of milliseconds per word at 100,000 chunks (bench/retrieval.py). So
# there the count is the planner's row estimate, from the column statistics
# that ANALYZE gathers, and a query for one match checks whether a word
# matches at all.
POSTGRESQL_ESTIMATE_TERM_COUNT = """
    EXPLAIN (FORMAT JSON)
    SELECT 1 FROM retrieval_chunk
    WHERE search_vector @@ to_tsquery('english', %(match)s)
"""
POSTGRESQL_BOUNDED_TERM_COUNT = """
    SELECT count(*) FROM (
        SELECT 1 FROM retrieval_chunk
        WHERE search_vector @@ to_tsquery('english', %(match)s)
        LIMIT %(limit)s
    ) AS bounded
"""
# The index-wide query fetches this many times the depth requested.
INDEX_WIDE_FACTOR = 2
# Connectors, by (id, index_version), whose index-wide ranking last fell
# short, so the joined query runs first. Bounded like an LRU.
MAX_REMEMBERED_CONNECTORS = 1024


@dataclass(frozen=True)
class KeywordMatch:
    chunk_id: object
    resource_id: object
    position: int
    score: float


def query_terms(text):
    """Return the distinct search words of `text`, lowercased and sorted.

    Stopwords and one-character words are dropped, and only the first
    MAX_QUERY_TERMS distinct words are kept.
    """
    terms = []
    for word in WORD.findall(text.lower()):
        if len(word) > 1 and word not in STOPWORDS and word not in terms:
            terms.append(word)
            if len(terms) == MAX_QUERY_TERMS:
                break
    return sorted(terms)


def rank_by_keywords(connector, terms, depth):
    """Return the `depth` best KeywordMatch rows of `connector` for `terms`.

    A chunk matches when it contains any of the terms that
    `prune_common_terms` keeps. Best first, and equal scores are ordered by
    resource id, then chunk position. Empty `terms` match nothing. Tries the index-wide query first, unless it fell
    short for this connector before, then the joined query.
    """
    if not terms or depth <= 0:
        return []
    terms = prune_common_terms(connector, terms)
    remembered = (connector.pk, connector.index_version)
    if remembered not in _joined_first:
        matches = rank_index_wide(connector, terms, depth)
        if matches is not None:
            return matches
        _joined_first.add(remembered)
    return rank_joined(connector, terms, depth)


def prune_common_terms(connector, terms):
    """Return the terms of `terms` that the ranking should query.

    A term is common when more than `common_term_threshold(connector)` chunks
    of the index contain it. Common terms, and terms that match no chunk,
    are dropped while a rarer term that matches remains. When every matching
    term is common, only the rarest is kept (see RAREST_TERM_COUNT_FACTOR).
    When no term matches, `terms` is returned unchanged.

    The ranking then finds and scores chunks by the kept terms alone. So a
    chunk that contains only dropped terms is not returned, and the dropped
    terms add nothing to the scores.
    """
    if len(terms) < 2:
        return terms
    threshold = common_term_threshold(connector)
    counts = {
        term: count_term_documents(connector, term, threshold + 1) for term in terms
    }
    rare = [term for term in terms if 0 < counts[term] <= threshold]
    if rare:
        return rare
    common = [term for term in terms if counts[term] > 0]
    if not common:
        return terms
    limit = RAREST_TERM_COUNT_FACTOR * threshold + 1
    rarest = min(
        common, key=lambda term: (count_term_documents(connector, term, limit), term)
    )
    return [rarest]


def common_term_threshold(connector):
    """Return the document count above which a term is common in the index."""
    key = ("chunks", connector.pk, connector.index_version)
    chunks = _counts.get(key)
    if chunks is None:
        chunks = Chunk.objects.count()
        _counts.put(key, chunks)
    return max(MIN_COMMON_TERM_DOCUMENTS, math.ceil(COMMON_TERM_SHARE * chunks))


def count_term_documents(connector, term, limit):
    """Return how many indexed chunks contain `term`, counting at most `limit`.

    On PostgreSQL a count above zero is the planner's estimate.

    Counts are remembered per `connector` index version, so an ingest into
    the connector counts again. Ingests into other connectors do not, so a
    count can be out of date. It only steers which terms are queried.
    """
    key = ("term", connector.pk, connector.index_version, term, limit)
    documents = _counts.get(key)
    if documents is None:
        match = _params(connector, [term], limit)["match"]
        if _vendor() == "sqlite":
            documents = _count_bounded(SQLITE_BOUNDED_TERM_COUNT, match, limit)
        else:
            documents = min(limit, _estimate_postgresql_count(match))
            if _count_bounded(POSTGRESQL_BOUNDED_TERM_COUNT, match, 1) == 0:
                documents = 0
        _counts.put(key, documents)
    return documents


def _count_bounded(sql, match, limit):
    with connection.cursor() as cursor:
        cursor.execute(sql, {"match": match, "limit": limit})
        return cursor.fetchone()[0]


def _estimate_postgresql_count(match):
    """Return the planner's estimate of the chunks that match `match`.

    NOTE: the estimate comes from a sample of the table, so a word near the
    common-word threshold can change sides after the next ANALYZE, and with
    it the ranking of a query that contains it. Without statistics the
    planner assumes a low match rate for every word, so only words that
    match no chunk are dropped.
    """
    with connection.cursor() as cursor:
        cursor.execute(POSTGRESQL_ESTIMATE_TERM_COUNT, {"match": match})
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def rank_index_wide(connector, terms, depth):
    """Rank with the index-wide query, or return None if it cannot tell.

    It fetches the INDEX_WIDE_FACTOR x `depth` best matches of all
    connectors. Rows at the lowest score fetched are dropped, because others
    with that score may be missing, and every match scoring above it was
    fetched. So when at least `depth` of the rest are the connector's, they
    are its exact best; otherwise this returns None.
    """
    limit = INDEX_WIDE_FACTOR * depth
    sql = SQLITE_INDEX_WIDE if _vendor() == "sqlite" else POSTGRESQL_INDEX_WIDE
    rows = _fetch(sql, _params(connector, terms, limit))
    complete = len(rows) < limit
    if not complete:
        cut = min(match.score for match, _ in rows)
        rows = [(match, own) for match, own in rows if match.score > cut]
    matches = [match for match, own in rows if own]
    if not complete and len(matches) < depth:
        return None
    matches.sort(key=lambda match: (-match.score, match.resource_id, match.position))
    return matches[:depth]


def rank_joined(connector, terms, depth):
    """Rank with the joined query, which filters every match by connector."""
    sql = SQLITE_JOINED if _vendor() == "sqlite" else POSTGRESQL_JOINED
    return [match for match, _ in _fetch(sql, _params(connector, terms, depth))]


def _vendor():
    if connection.vendor not in ("sqlite", "postgresql"):
        raise SearchUnavailable(
            "KEYWORD_SEARCH_UNSUPPORTED",
            f"Keyword search needs SQLite or PostgreSQL, not {connection.vendor}.",
            status_code=501,
        )
    return connection.vendor


def _params(connector, terms, limit):
    if connection.vendor == "sqlite":
        # Each word becomes a quoted string, so FTS5 operators in the input
        # (OR, NEAR, *, -, :, parentheses) are plain words or were dropped.
        match = " OR ".join(f'"{term}"' for term in terms)
    else:
        # Quoted lexemes joined by |, which is safe because the words contain
        # no quote or operator.
        match = " | ".join(f"'{term}'" for term in terms)
    connector_field = Resource._meta.get_field("connector").target_field
    return {
        "match": match,
        "connector": connector_field.get_db_prep_value(connector.pk, connection),
        "limit": limit,
    }


def _fetch(sql, params):
    """Run one ranking query; return `(KeywordMatch, is the connector's)` rows."""
    to_uuid = Chunk._meta.pk.to_python
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [
            (
                KeywordMatch(to_uuid(chunk_id), to_uuid(resource_id), position, score),
                bool(own),
            )
            for chunk_id, resource_id, position, score, own in cursor.fetchall()
        ]


def forget_query_choices():
    """Let every connector try the index-wide query again, and forget counts."""
    _joined_first.clear()
    _counts.clear()


class RememberedConnectors:
    """A set bounded to MAX_REMEMBERED_CONNECTORS, oldest dropped first."""

    def __init__(self, max_entries=MAX_REMEMBERED_CONNECTORS):
        self.max_entries = max_entries
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key):
        with self._lock:
            return key in self._entries

    def add(self, key):
        with self._lock:
            self._entries[key] = True
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self):
        with self._lock:
            self._entries.clear()


class RememberedCounts:
    """A mapping bounded to MAX_REMEMBERED_COUNTS, least recently used dropped."""

    def __init__(self, max_entries=MAX_REMEMBERED_COUNTS):
        self.max_entries = max_entries
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key, value):
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self):
        with self._lock:
            self._entries.clear()


_joined_first = RememberedConnectors()
_counts = RememberedCounts()


def rebuild_fulltext_index():
    """Rebuild the SQLite full-text index from retrieval_chunk.

    Needed after a VACUUM or a table remake has renumbered the chunk rowids.
    PostgreSQL computes its column with each row, so there it does nothing.
    """
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO retrieval_chunk_fts (retrieval_chunk_fts) "
                "VALUES ('rebuild')"
            )
