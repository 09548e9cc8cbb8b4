"""Candidate generation: keyword, vector and hybrid search, and embeddings.

Runs on whichever database the suite uses, so it covers FTS5 on SQLite and,
with DATABASE_URL set, tsvector on PostgreSQL.
"""

import math

import numpy as np
import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis import strategies as st

from answers.local_openai import EMBEDDING_DIMENSIONS, embed_text
from keyvault.vault import set_llm_api_key
from orgs.models import Organization
from retrieval import engines
from retrieval.embeddings import embed_query, embed_texts, to_bytes
from retrieval.engines import SearchUnavailable, bump_index_version, search_candidates
from retrieval import fulltext
from retrieval.fulltext import (
    prune_common_terms,
    rank_by_keywords,
    rank_index_wide,
    rank_joined,
    rebuild_fulltext_index,
)
from retrieval.models import Chunk, Connector, Principal, Resource
from retrieval.vector_index import index_cache, top_rows

ORGANIZATION_KEY = "sk-engines-organization-key-0000000000ORG1"

CORPUS = {
    "refunds.md": "Annual plans get a full refund within thirty days of purchase.",
    "refund-requests.md": "Refund requests go to the billing team by email.",
    "holidays.md": "The office closes for public holidays and the winter break.",
    "laptops.md": "Engineers receive a laptop and a second monitor on day one.",
    "travel.md": "Book travel through the portal and keep every receipt.",
}


@pytest.fixture(autouse=True)
def empty_caches():
    engines.clear_caches()
    yield
    engines.clear_caches()


def make_connector(slug="engines", name="docs"):
    organization, _ = Organization.objects.get_or_create(
        slug=slug, defaults={"name": slug.title()}
    )
    return Connector.objects.create(organization=organization, name=name)


def add_chunk(connector, external_id, text, embedding=None, position=0, owner=None):
    resource, _ = Resource.objects.get_or_create(
        connector=connector,
        external_id=external_id,
        defaults={"title": external_id, "owner": owner},
    )
    vector = embed_text(text) if embedding is None else embedding
    return Chunk.objects.create(
        resource=resource,
        position=position,
        text=text,
        embedding=to_bytes(vector) if len(vector) else b"",
    )


@pytest.fixture
def corpus(db):
    connector = make_connector()
    chunks = {name: add_chunk(connector, name, text) for name, text in CORPUS.items()}
    return connector, chunks


def names(candidates):
    return [candidate.chunk.resource.external_id for candidate in candidates]


def search(connector, query, **options):
    return search_candidates(connector, query=query, **options)


def one_hot(row):
    vector = [0.0] * EMBEDDING_DIMENSIONS
    vector[row] = 1.0
    return vector


# --- keyword -----------------------------------------------------------------


def test_keyword_prefers_more_matching_terms(corpus):
    connector, _ = corpus

    found = names(search(connector, "refund for annual plans"))

    assert found[0] == "refunds.md"
    assert found[1:] == ["refund-requests.md"]


def test_keyword_matches_word_forms(corpus):
    connector, _ = corpus

    found = names(search(connector, "refunds"))

    assert sorted(found) == ["refund-requests.md", "refunds.md"]


@pytest.mark.parametrize("query", ["", "   ", "the and of", "a", "?!.,"])
def test_keyword_query_without_words_is_empty(corpus, query):
    connector, _ = corpus

    assert search(connector, query) == []


def test_keyword_candidate_has_keyword_rank(corpus):
    connector, _ = corpus

    [first, second] = search(connector, "refund annual")

    assert (first.keyword_rank, second.keyword_rank) == (1, 2)
    assert first.vector_rank is None
    assert first.score > second.score


def test_keyword_ties_follow_resource_then_position(db):
    connector = make_connector()
    for position in (2, 0, 1):
        add_chunk(connector, "b.md", "identical sentence", position=position)
    add_chunk(connector, "a.md", "identical sentence")

    found = search(connector, "identical")

    order = [(c.chunk.resource_id, c.chunk.position) for c in found]
    assert order == sorted(order)


def test_fulltext_indexes_inserted_chunk(corpus):
    connector, _ = corpus
    assert search(connector, "kayak") == []

    add_chunk(connector, "kayak.md", "The team kayak trip is in June.")
    bump_index_version(connector)

    assert names(search(connector, "kayak")) == ["kayak.md"]


def test_fulltext_follows_updated_text(corpus):
    connector, chunks = corpus
    chunk = chunks["travel.md"]

    chunk.text = "Expense claims need a manager's approval."
    chunk.save()
    bump_index_version(connector)

    assert search(connector, "receipt portal") == []
    assert names(search(connector, "expense approval")) == ["travel.md"]


def test_fulltext_forgets_deleted_chunk(corpus):
    connector, chunks = corpus

    chunks["holidays.md"].delete()

    matches = rank_by_keywords(connector, ["holidays", "winter"], depth=10)
    assert matches == []


def test_deleted_resource_chunks_never_appear(corpus):
    connector, chunks = corpus
    search(connector, "refund")

    chunks["refunds.md"].resource.delete()
    bump_index_version(connector)

    assert names(search(connector, "refund annual plans")) == ["refund-requests.md"]
    assert rank_by_keywords(connector, ["annual"], depth=10) == []


def test_fulltext_rebuild_keeps_matches(corpus):
    connector, _ = corpus
    before = rank_by_keywords(connector, ["refund"], depth=10)

    rebuild_fulltext_index()

    assert rank_by_keywords(connector, ["refund"], depth=10) == before


@pytest.fixture
def crowded_index(db):
    """A small connector beside a large one, with overlapping words and ties."""
    small, large = make_connector(name="small"), make_connector(name="large")
    for number in range(4):
        add_chunk(small, f"s{number}.md", "budget review " * (number % 2 + 1))
    for number in range(30):
        add_chunk(large, f"l{number}.md", "budget budget review " * (number % 3 + 1))
    return small, large


def test_index_wide_ranking_equals_joined(crowded_index):
    terms = ["budget", "review"]
    for connector in crowded_index:
        for depth in (1, 2, 3, 5, 50):
            wide = rank_index_wide(connector, terms, depth)
            if wide is not None:
                assert wide == rank_joined(connector, terms, depth)


def test_index_wide_ranking_falls_short(crowded_index):
    small, _ = crowded_index

    assert rank_index_wide(small, ["budget"], depth=2) is None


def test_keyword_ranking_falls_back_to_joined(crowded_index):
    small, _ = crowded_index

    matches = rank_by_keywords(small, ["budget"], depth=2)

    assert matches == rank_joined(small, ["budget"], depth=2)
    assert len(matches) == 2


@pytest.fixture
def common_word_corpus(db, monkeypatch):
    """Twelve chunks with "budget", two of them with "kestrel" as well.

    Any word in more than 3 chunks counts as common here.
    """
    monkeypatch.setattr(fulltext, "MIN_COMMON_TERM_DOCUMENTS", 3)
    monkeypatch.setattr(fulltext, "COMMON_TERM_SHARE", 0.01)
    connector = make_connector()
    for number in range(10):
        add_chunk(connector, f"budget{number:02}.md", "budget " * (number + 1))
    add_chunk(connector, "kestrel-a.md", "kestrel budget")
    add_chunk(connector, "kestrel-b.md", "kestrel sighting budget")
    refresh_statistics()
    return connector


def refresh_statistics():
    """Update the PostgreSQL statistics that estimate word frequencies."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE retrieval_chunk")


def test_common_term_pruned_beside_rare_term(common_word_corpus):
    connector = common_word_corpus

    assert prune_common_terms(connector, ["budget", "kestrel"]) == ["kestrel"]


def test_ranking_skips_common_term_matches(common_word_corpus):
    connector = common_word_corpus

    matches = rank_by_keywords(connector, ["budget", "kestrel"], depth=20)

    assert len(matches) == 2
    assert matches == rank_joined(connector, ["kestrel"], depth=20)


def test_common_term_kept_when_alone(common_word_corpus):
    connector = common_word_corpus

    assert prune_common_terms(connector, ["budget"]) == ["budget"]
    assert len(rank_by_keywords(connector, ["budget"], depth=20)) == 12


def test_unmatched_term_pruned_beside_common_term(common_word_corpus):
    connector = common_word_corpus
    terms = ["budget", "nonexistentword"]

    assert prune_common_terms(connector, terms) == ["budget"]
    assert len(rank_by_keywords(connector, terms, depth=20)) == 12


def test_rarest_common_term_kept_alone(common_word_corpus):
    connector = common_word_corpus
    for number in range(4):
        add_chunk(connector, f"ledger{number}.md", "ledger budget")
    refresh_statistics()
    engines.clear_caches()

    assert prune_common_terms(connector, ["budget", "ledger"]) == ["ledger"]


def test_unmatched_terms_kept_unchanged(common_word_corpus):
    connector = common_word_corpus
    terms = ["nonexistentword", "otherword"]

    assert prune_common_terms(connector, terms) == terms
    assert rank_by_keywords(connector, terms, depth=20) == []


def test_two_rare_terms_both_kept(common_word_corpus):
    connector = common_word_corpus

    pruned = prune_common_terms(connector, ["budget", "kestrel", "sighting"])

    assert pruned == ["kestrel", "sighting"]


def test_small_connector_keeps_common_terms(db):
    connector = make_connector()
    for number in range(10):
        add_chunk(connector, f"budget{number:02}.md", "budget review")
    add_chunk(connector, "kestrel.md", "kestrel budget")

    assert prune_common_terms(connector, ["budget", "kestrel"]) == [
        "budget",
        "kestrel",
    ]


def test_pruned_ranking_is_repeatable(common_word_corpus):
    connector = common_word_corpus
    terms = ["budget", "kestrel", "sighting"]
    first = rank_by_keywords(connector, terms, depth=20)

    engines.clear_caches()

    assert rank_by_keywords(connector, terms, depth=20) == first


HOSTILE_QUERIES = [
    '"',
    "'",
    '""',
    "*",
    "**",
    "NEAR",
    "NEAR(kite string)",
    "-",
    "-kite",
    ":",
    "text:",
    "(",
    ")",
    "()",
    "OR",
    "OR OR OR",
    "AND NOT",
    "'; DROP TABLE retrieval_chunk; --",
    '"; DROP TABLE retrieval_chunk; --',
    "%",
    "_",
    "\\",
    "^",
    "{}",
    "!",
    "&|!",
    "<->",
    "a:*",
]


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_hostile_query_matches_nothing(corpus, query):
    connector, _ = corpus

    assert search(connector, query) == []


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_hostile_query_mixed_with_words(corpus, query):
    connector, _ = corpus

    found = names(search(connector, f"{query} laptop {query}"))

    assert found == ["laptops.md"]


def test_hostile_query_leaves_tables_intact(corpus):
    connector, _ = corpus

    search(connector, "'; DROP TABLE retrieval_chunk; --")

    assert Chunk.objects.filter(resource__connector=connector).count() == len(CORPUS)


@pytest.mark.django_db
@hypothesis_settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(query=st.text(max_size=80))
def test_any_text_searches_without_error(corpus, query):
    connector, chunks = corpus

    found = search(connector, query)

    assert {c.chunk.pk for c in found} <= {chunk.pk for chunk in chunks.values()}


# --- vector ------------------------------------------------------------------


def test_vector_nearest_chunk_first(corpus):
    connector, _ = corpus
    vector = embed_text("holidays winter break office")

    found = search(connector, "", search_mode="vector", query_vector=vector)

    assert found[0].chunk.resource.external_id == "holidays.md"
    assert found[0].vector_rank == 1
    assert found[0].keyword_rank is None


def test_vector_scores_are_cosine_similarities(corpus):
    connector, chunks = corpus
    vector = embed_text("travel receipt")
    expected = np.dot(embed_text(CORPUS["travel.md"]), vector) / np.linalg.norm(vector)

    found = search(connector, "", search_mode="vector", query_vector=vector)

    travel = next(c for c in found if c.chunk.pk == chunks["travel.md"].pk)
    assert math.isclose(travel.score, expected, rel_tol=1e-5)


def test_vector_ranks_every_embedded_chunk(corpus):
    connector, _ = corpus

    found = search(connector, "", search_mode="vector", query_vector=one_hot(0))

    assert len(found) == len(CORPUS)


def test_vector_skips_unembedded_chunks(corpus):
    connector, _ = corpus
    add_chunk(connector, "blank.md", "No embedding here.", embedding=[])
    bump_index_version(connector)

    found = search(connector, "", search_mode="vector", query_vector=one_hot(0))

    assert "blank.md" not in names(found)


def test_vector_embeds_query_with_organization_key(corpus, openai_server, settings):
    connector, _ = corpus
    set_llm_api_key(connector.organization, ORGANIZATION_KEY)

    found = search(connector, "laptop monitor engineers", search_mode="vector")

    assert found[0].chunk.resource.external_id == "laptops.md"
    [request] = openai_server.requests
    assert request["path"] == "/v1/embeddings"
    assert request["status"] == 200
    assert request["key_last4"] == ORGANIZATION_KEY[-4:]
    assert request["model"] == settings.GATECO_EMBEDDING_MODEL


def test_vector_pages_embed_query_once(corpus, openai_server, monkeypatch):
    connector, _ = corpus
    set_llm_api_key(connector.organization, ORGANIZATION_KEY)
    # Every page then goes past the ranking and makes it deeper.
    monkeypatch.setattr(engines, "FIRST_DEPTH", 1)

    for offset in range(len(CORPUS)):
        search(connector, "laptop", search_mode="vector", limit=1, offset=offset)

    assert len(openai_server.requests) == 1


def test_vector_without_key_or_vector_raises(corpus, openai_server):
    connector, _ = corpus

    with pytest.raises(SearchUnavailable) as raised:
        search(connector, "laptop", search_mode="vector")

    assert raised.value.code == "EMBEDDING_KEY_MISSING"
    assert raised.value.status_code == 422
    assert openai_server.requests == []


def test_vector_blank_query_without_vector_is_empty(corpus):
    connector, _ = corpus

    assert search(connector, "  ", search_mode="vector") == []


def test_vector_dimension_mismatch_raises(corpus):
    connector, _ = corpus

    with pytest.raises(SearchUnavailable) as raised:
        search(connector, "", search_mode="vector", query_vector=[0.1, 0.2, 0.3])

    assert raised.value.code == "VECTOR_DIMENSION_MISMATCH"
    assert "3 dimensions" in raised.value.message


@pytest.mark.parametrize(
    "vector", [[], [0.0] * EMBEDDING_DIMENSIONS, [math.nan] * EMBEDDING_DIMENSIONS]
)
def test_vector_invalid_query_vector_raises(corpus, vector):
    connector, _ = corpus

    with pytest.raises(SearchUnavailable) as raised:
        search(connector, "", search_mode="vector", query_vector=vector)

    assert raised.value.code == "INVALID_QUERY_VECTOR"


def test_vector_index_rebuilds_after_version_change(corpus):
    connector, _ = corpus
    query = embed_text("canoe lake weekend")
    first = index_cache.get(connector)
    add_chunk(connector, "canoe.md", "A canoe weekend at the lake.")

    # Until the version changes, the process keeps serving its index.
    assert index_cache.get(connector) is first
    bump_index_version(connector)

    found = search(connector, "", search_mode="vector", query_vector=query)
    assert index_cache.get(connector) is not first
    assert found[0].chunk.resource.external_id == "canoe.md"


def test_vector_index_keeps_few_connectors(db):
    connectors = [make_connector(name=f"docs-{n}") for n in range(6)]
    for connector in connectors:
        add_chunk(connector, "a.md", "alpha")
        index_cache.get(connector)

    cached = [c for c in connectors if index_cache._cached(c) is not None]

    assert len(cached) == index_cache.max_entries


def test_top_rows_breaks_ties_by_row():
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1], dtype=np.float32)

    assert top_rows(scores, 2).tolist() == [1, 0]
    assert top_rows(scores, 3).tolist() == [1, 0, 2]
    assert top_rows(scores, 10).tolist() == [1, 0, 2, 3, 4]


# --- hybrid ------------------------------------------------------------------


@pytest.fixture
def split_corpus(db):
    """Chunks whose keyword and vector rankings disagree.

    The embeddings are one-hot, so the vector ranking for one_hot(0) is k0,
    then the rest in resource order. "shared" has the query words but the
    second-best embedding direction, "words" has them but no overlap.
    """
    connector = make_connector()
    add_chunk(connector, "k0.md", "Nothing relevant at all.", embedding=one_hot(0))
    add_chunk(connector, "shared.md", "quarterly revenue", embedding=one_hot(1))
    add_chunk(
        connector,
        "words.md",
        "quarterly revenue grew, quarterly revenue fell",
        embedding=one_hot(2),
    )
    return connector


def hybrid(connector, alpha, **options):
    return search(
        connector,
        "quarterly revenue",
        search_mode="hybrid",
        query_vector=[1.0, 0.1] + [0.0] * (EMBEDDING_DIMENSIONS - 2),
        alpha=alpha,
        **options,
    )


def test_hybrid_alpha_zero_is_keyword_order(split_corpus):
    keyword = names(search(split_corpus, "quarterly revenue"))

    assert names(hybrid(split_corpus, 0.0)) == keyword


def test_hybrid_alpha_one_is_vector_order(split_corpus):
    vector = names(
        search(
            split_corpus,
            "",
            search_mode="vector",
            query_vector=[1.0, 0.1] + [0.0] * (EMBEDDING_DIMENSIONS - 2),
        )
    )

    assert names(hybrid(split_corpus, 1.0)) == vector


def test_hybrid_alpha_half_mixes_both(split_corpus):
    found = names(hybrid(split_corpus, 0.5))

    # k0 is the best vector match but has none of the words, so the two
    # chunks that rank in both lists overtake it.
    assert sorted(found) == ["k0.md", "shared.md", "words.md"]
    assert found[-1] == "k0.md"


def test_hybrid_score_is_rrf(split_corpus):
    found = hybrid(split_corpus, 0.3)

    for candidate in found:
        expected = 0.0
        if candidate.vector_rank is not None:
            expected += 0.3 / (60 + candidate.vector_rank)
        if candidate.keyword_rank is not None:
            expected += 0.7 / (60 + candidate.keyword_rank)
        assert math.isclose(candidate.score, expected)


def test_hybrid_alpha_zero_needs_no_vector(split_corpus, openai_server):
    found = search(split_corpus, "quarterly revenue", search_mode="hybrid", alpha=0)

    assert len(found) == 2
    assert openai_server.requests == []


def test_hybrid_without_key_or_vector_raises(split_corpus, openai_server):
    with pytest.raises(SearchUnavailable) as raised:
        search(split_corpus, "quarterly revenue", search_mode="hybrid")

    assert raised.value.code == "EMBEDDING_KEY_MISSING"


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan, "half"])
def test_invalid_alpha_raises(split_corpus, alpha):
    with pytest.raises(SearchUnavailable) as raised:
        hybrid(split_corpus, alpha)

    assert raised.value.code == "INVALID_ALPHA"


# --- pages, connectors, loading ------------------------------------------------


@pytest.fixture
def large_corpus(db):
    connector = make_connector()
    for number in range(23):
        text = "policy " * (1 + number % 5) + f"section {number}"
        add_chunk(connector, f"doc-{number:02}.md", text)
    return connector


MODE_OPTIONS = {
    "keyword": {},
    "vector": {"query_vector": embed_text("policy section")},
    "hybrid": {"query_vector": embed_text("policy section"), "alpha": 0.5},
}


@pytest.mark.parametrize("mode", engines.SEARCH_MODES)
def test_pages_match_full_ranking(large_corpus, mode):
    options = MODE_OPTIONS[mode]
    full = search(large_corpus, "policy", search_mode=mode, limit=100, **options)

    engines.clear_caches()
    pages = []
    for offset in range(0, 30, 4):
        pages += search(
            large_corpus, "policy", search_mode=mode, limit=4, offset=offset, **options
        )

    assert [c.chunk.pk for c in pages] == [c.chunk.pk for c in full]
    assert len(full) == 23


@pytest.mark.parametrize("mode", engines.SEARCH_MODES)
def test_pages_stay_consistent_when_ranking_deepens(large_corpus, mode, monkeypatch):
    options = MODE_OPTIONS[mode]
    monkeypatch.setattr(engines, "FIRST_DEPTH", 2)

    pages = []
    for offset in range(0, 30, 3):
        pages += search(
            large_corpus, "policy", search_mode=mode, limit=3, offset=offset, **options
        )

    ids = [c.chunk.pk for c in pages]
    assert len(ids) == 23
    assert len(set(ids)) == 23


def test_page_past_the_end_is_empty(corpus):
    connector, _ = corpus

    assert search(connector, "refund", offset=10, limit=5) == []


@pytest.mark.parametrize("mode", engines.SEARCH_MODES)
def test_other_connectors_never_appear(corpus, mode):
    connector, chunks = corpus
    sibling = make_connector(name="sibling")
    stranger = make_connector(slug="stranger")
    for other in (sibling, stranger):
        for name, text in CORPUS.items():
            add_chunk(other, name, text)

    found = search(
        connector,
        "refund holidays laptop travel",
        search_mode=mode,
        query_vector=embed_text("refund holidays laptop travel"),
        limit=100,
    )

    own = {chunk.pk for chunk in chunks.values()}
    assert {c.chunk.pk for c in found} <= own
    assert len(found) > 0


def test_candidates_come_with_resource_and_owner(db, django_assert_num_queries):
    connector = make_connector()
    owner = Principal.objects.create(
        organization=connector.organization, external_id="dana@example.test"
    )
    add_chunk(connector, "owned.md", "owned document", owner=owner)
    [candidate] = search(connector, "owned")

    with django_assert_num_queries(0):
        external_id = candidate.chunk.resource.owner.external_id

    assert external_id == "dana@example.test"


def test_unknown_search_mode_raises(corpus):
    connector, _ = corpus

    with pytest.raises(ValueError):
        search(connector, "refund", search_mode="semantic")


# --- embeddings ----------------------------------------------------------------


def test_embed_texts_sends_one_request_per_hundred(db, openai_server):
    organization = make_connector().organization
    set_llm_api_key(organization, ORGANIZATION_KEY)
    texts = [f"document number {n}" for n in range(150)]

    vectors = embed_texts(organization, texts)

    assert len(openai_server.requests) == 2
    assert len(vectors) == 150
    assert np.allclose(vectors[149], embed_text(texts[149]), atol=1e-6)


def test_embed_texts_without_key_is_none(db, openai_server):
    organization = make_connector().organization

    assert embed_texts(organization, ["text"]) is None
    assert openai_server.requests == []


def test_embed_texts_rejects_empty_text(db):
    organization = make_connector().organization

    with pytest.raises(ValueError):
        embed_texts(organization, ["text", " "])


def test_embed_query_uses_configured_dimensions(db, openai_server, settings):
    organization = make_connector().organization
    set_llm_api_key(organization, ORGANIZATION_KEY)

    vector = embed_query(organization, "refund")

    assert len(vector) == settings.GATECO_EMBEDDING_DIMENSIONS


@pytest.mark.parametrize("failure", ["401", "429", "quota", "500"])
def test_embedding_failure_raises_without_key(db, openai_server, failure):
    organization = make_connector().organization
    set_llm_api_key(organization, ORGANIZATION_KEY)
    openai_server.set_failure(failure)

    with pytest.raises(SearchUnavailable) as raised:
        embed_query(organization, "refund")

    assert raised.value.code == "EMBEDDING_FAILED"
    assert raised.value.status_code == 502
    assert ORGANIZATION_KEY[-4:] not in raised.value.message


def test_embedding_rejected_key_message(db, openai_server):
    organization = make_connector().organization
    set_llm_api_key(organization, ORGANIZATION_KEY)
    openai_server.set_failure("401")

    with pytest.raises(SearchUnavailable) as raised:
        embed_query(organization, "refund")

    assert "rejected" in raised.value.message


def test_embedding_timeout_raises(db, openai_server, settings):
    settings.GATECO_LLM_TIMEOUT_SECONDS = 0.2
    organization = make_connector().organization
    set_llm_api_key(organization, ORGANIZATION_KEY)
    openai_server.set_failure("slow", delay_seconds=2)

    with pytest.raises(SearchUnavailable) as raised:
        embed_query(organization, "refund")

    assert "in time" in raised.value.message


# --- the migration ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_migration_indexes_existing_rows():
    executor = MigrationExecutor(connection)
    executor.migrate([("retrieval", "0002_policy_depth_and_audit")])
    connector = make_connector()
    add_chunk(connector, "old.md", "Written before the full-text index existed.")

    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())

    assert names(search(connector, "written before")) == ["old.md"]
