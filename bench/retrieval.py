"""Time policy-filtered retrieval at 1,000 and 100,000 chunks, per search mode.

Builds a throwaway database: SQLite in a temporary GATECO_DATA_DIR, or, when
DATABASE_URL is set, a database named gateco_bench on that PostgreSQL server,
created here and dropped at the end. One connector gets a synthetic corpus
(Zipf-distributed words, local hashed embeddings computed in process),
resources with mixed classification, sensitivity, domain, labels and owners,
five principals and 15 active policies. The corpus grows from the first size
to the next in the same connector, then each size runs the same queries in
keyword, vector and hybrid mode through retrieval.search.execute_retrieval.

    .venv/bin/python bench/retrieval.py [--sizes 1000,100000] [--queries 200]

Exits 1 when a target fails: policy evaluation p95 under 5 ms, and p95 at
the largest size within 3x p95 at the smallest, per mode.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCH_DATABASE = "gateco_bench"
MODES = ("keyword", "vector", "hybrid")
# A fifth of the published retrieval p95 of 25 ms.
POLICY_P95_TARGET_MS = 5.0
SCALING_TARGET = 3.0
CHUNKS_PER_RESOURCE = 5
INSERT_BATCH = 2000
STOPWORDS = (
    "the of and to a in is it that for on was with as be by this are from at or an "
    "which have not but has had were their all can its been more when will there "
    "so if into than them these other some what out only also our may each about "
    "such how should where who your most after over before any those"
).split()
LABELS = ("finance", "hr", "engineering", "legal", "sales", "board", "pii", "archived")
DOMAINS = ("finance", "hr", "engineering", "legal", "sales", "security")
PRINCIPALS = [
    ("ana@bench.test", ["employee", "analyst"], ["finance"], "finance", "confidential"),
    (
        "ben@bench.test",
        ["employee", "engineer"],
        ["engineering"],
        "engineering",
        "internal",
    ),
    ("cy@bench.test", ["employee", "counsel"], ["legal"], "legal", "restricted"),
    ("dee@bench.test", ["contractor"], ["sales"], "sales", "internal"),
    ("eli@bench.test", ["employee", "executive"], ["board", "hr"], "hr", "restricted"),
]


def parse_options():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="1000,100000",
        help="comma-separated chunk counts, ascending (default: 1000,100000)",
    )
    parser.add_argument(
        "--queries", type=int, default=200, help="queries per size and mode"
    )
    parser.add_argument("--top-k", type=int, default=10, help="top_k of each query")
    parser.add_argument("--seed", type=int, default=7, help="random seed")
    options = parser.parse_args()
    options.sizes = [int(size) for size in options.sizes.split(",")]
    if options.sizes != sorted(options.sizes):
        parser.error("--sizes must be ascending, because the corpus only grows")
    return options


# --- the throwaway database ---------------------------------------------------


def bench_database_url(database_url):
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(path=f"/{BENCH_DATABASE}"))


def recreate_postgresql_database(database_url, drop_only=False):
    """Create (or with drop_only, drop) BENCH_DATABASE on the server of the URL."""
    import psycopg
    from psycopg import sql

    maintenance = urlunsplit(urlsplit(database_url)._replace(path="/postgres"))
    name = sql.Identifier(BENCH_DATABASE)
    with psycopg.connect(maintenance, autocommit=True) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name)
        )
        if not drop_only:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(name))


# --- the corpus ------------------------------------------------------------------


def make_vocabulary(rng, size=4000):
    """Return STOPWORDS followed by `size` distinct made-up content words."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words, seen = [], set(STOPWORDS)
    while len(words) < size:
        word = "".join(rng.choice(syllables, size=rng.integers(2, 5)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return STOPWORDS + words


def zipf_probabilities(count, exponent=1.05, shift=2.7):
    """Zipf-Mandelbrot weights, p(rank) proportional to 1 / (rank + shift)^exponent."""
    import numpy as np

    weights = 1.0 / (np.arange(1, count + 1) + shift) ** exponent
    return weights / weights.sum()


def make_texts(rng, vocabulary, probabilities, count):
    lengths = rng.integers(60, 121, size=count)
    words = rng.choice(len(vocabulary), size=int(lengths.sum()), p=probabilities)
    texts, start = [], 0
    for length in lengths:
        chosen = words[start : start + length]
        start += length
        sentence = " ".join(vocabulary[index] for index in chosen)
        texts.append(sentence[0].upper() + sentence[1:] + ".")
    return texts


def make_queries(rng, vocabulary, count):
    """Return `count` distinct queries of 2 to 5 content words, some in a question."""
    content = vocabulary[len(STOPWORDS) :]
    probabilities = zipf_probabilities(len(content))
    queries = set()
    while len(queries) < count:
        picked = rng.choice(len(content), size=rng.integers(2, 6), p=probabilities)
        words = [content[index] for index in picked]
        if rng.random() < 0.3:
            queries.add(f"what is the {words[0]} of {' '.join(words[1:])}?")
        else:
            queries.add(" ".join(words))
    return sorted(queries)


def add_chunks(connector, principals, rng, vocabulary, first_number, count):
    """Add `count` chunks in resources of CHUNKS_PER_RESOURCE, with embeddings."""
    from answers.local_openai import embed_text
    from retrieval.embeddings import to_bytes
    from retrieval.models import Chunk, Classification, Resource, Sensitivity

    probabilities = zipf_probabilities(len(vocabulary))
    classifications = list(Classification.values)
    sensitivities = list(Sensitivity.values)
    for batch_start in range(0, count, INSERT_BATCH):
        batch_count = min(INSERT_BATCH, count - batch_start)
        texts = make_texts(rng, vocabulary, probabilities, batch_count)
        resources = []
        for offset in range(0, batch_count, CHUNKS_PER_RESOURCE):
            number = first_number + batch_start + offset
            labels = [
                str(label)
                for label in rng.choice(LABELS, rng.integers(0, 3), replace=False)
            ]
            # Half of the resources have an owner.
            owner_index = number // CHUNKS_PER_RESOURCE % (2 * len(principals))
            resources.append(
                Resource(
                    connector=connector,
                    external_id=f"doc-{number:07}.md",
                    title=f"Document {number}",
                    classification=classifications[rng.integers(len(classifications))],
                    sensitivity=sensitivities[rng.integers(len(sensitivities))],
                    domain=DOMAINS[rng.integers(len(DOMAINS))],
                    labels=labels,
                    owner=principals[owner_index]
                    if owner_index < len(principals)
                    else None,
                )
            )
        Resource.objects.bulk_create(resources)
        chunks = [
            Chunk(
                resource=resources[index // CHUNKS_PER_RESOURCE],
                position=index % CHUNKS_PER_RESOURCE,
                text=text,
                embedding=to_bytes(embed_text(text)),
            )
            for index, text in enumerate(texts)
        ]
        Chunk.objects.bulk_create(chunks)


def condition(field, operator, value):
    return {"field": field, "operator": operator, "value": value}


def policy_definitions():
    """Return 15 (name, effect, conditions) policies: 10 allow, 5 deny."""
    return [
        ("public", "allow", [condition("resource.classification", "eq", "public")]),
        (
            "internal-for-employees",
            "allow",
            [
                condition("resource.classification", "eq", "internal"),
                condition("principal.roles", "contains", "employee"),
            ],
        ),
        (
            "own-domain-up-to-clearance",
            "allow",
            [
                condition("resource.domain", "eq", "{{principal.department}}"),
                condition("resource.classification", "lte", "{{principal.clearance}}"),
            ],
        ),
        (
            "finance-label",
            "allow",
            [
                condition("resource.labels", "contains", "finance"),
                condition("principal.department", "eq", "finance"),
            ],
        ),
        (
            "hr-group",
            "allow",
            [
                condition("resource.labels", "contains", "hr"),
                condition("principal.groups", "contains", "hr"),
            ],
        ),
        (
            "engineering-departments",
            "allow",
            [
                condition("resource.labels", "contains", "engineering"),
                condition("principal.department", "in", ["engineering", "security"]),
            ],
        ),
        (
            "owners",
            "allow",
            [condition("resource.owner", "eq", "{{principal.external_id}}")],
        ),
        (
            "analysts-low-sensitivity",
            "allow",
            [
                condition("resource.sensitivity", "lte", "medium"),
                condition("principal.roles", "contains", "analyst"),
            ],
        ),
        (
            "counsel-legal",
            "allow",
            [
                condition("resource.domain", "in", ["legal", "hr"]),
                condition("principal.roles", "contains", "counsel"),
            ],
        ),
        (
            "executives-board",
            "allow",
            [
                condition("resource.labels", "contains", "board"),
                condition("principal.roles", "contains", "executive"),
            ],
        ),
        (
            "restricted-needs-clearance",
            "deny",
            [
                condition("resource.classification", "eq", "restricted"),
                condition("principal.clearance", "ne", "restricted"),
            ],
        ),
        (
            "no-pii-for-contractors",
            "deny",
            [
                condition("resource.labels", "contains", "pii"),
                condition("principal.roles", "contains", "contractor"),
            ],
        ),
        (
            "critical-only-security",
            "deny",
            [
                condition("resource.sensitivity", "gte", "critical"),
                condition("principal.department", "ne", "security"),
            ],
        ),
        ("archived", "deny", [condition("resource.labels", "contains", "archived")]),
        (
            "confidential-sales-for-sales",
            "deny",
            [
                condition("resource.domain", "eq", "sales"),
                condition("resource.classification", "gte", "confidential"),
                condition("principal.department", "in", ["finance", "engineering"]),
            ],
        ),
    ]


def create_organization():
    from orgs.models import Organization, Tier
    from retrieval.models import Connector, Policy, PolicyStatus, Principal

    # A paid tier, because the free tier stops after 100 retrievals a month.
    organization = Organization.objects.create(
        name="Bench", slug="bench", tier=Tier.TEAM
    )
    principals = [
        Principal.objects.create(
            organization=organization,
            external_id=external_id,
            email=external_id,
            roles=roles,
            groups=groups,
            attributes={"department": department, "clearance": clearance},
        )
        for external_id, roles, groups, department, clearance in PRINCIPALS
    ]
    for name, effect, conditions in policy_definitions():
        Policy.objects.create(
            organization=organization,
            name=name,
            effect=effect,
            status=PolicyStatus.ACTIVE,
            rules=[{"conditions": conditions}],
        )
    connector = Connector.objects.create(organization=organization, name="bench")
    return organization, principals, connector


# --- timing ------------------------------------------------------------------------


class PolicyClock:
    """Adds up, per retrieval, the time spent deciding and loading policies.

    Wraps PolicyEvaluator.decide and PolicyEvaluator.load, which
    execute_retrieval calls, in place on the class.
    """

    def __init__(self):
        from retrieval.policy import PolicyEvaluator

        self.decide_seconds = 0.0
        self.load_seconds = 0.0
        PolicyEvaluator.decide = self._timed(PolicyEvaluator.decide, "decide_seconds")
        load = PolicyEvaluator.load.__func__
        PolicyEvaluator.load = classmethod(self._timed(load, "load_seconds"))

    def reset(self):
        self.decide_seconds = self.load_seconds = 0.0

    def _timed(self, function, counter):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                setattr(self, counter, getattr(self, counter) + elapsed)

        return timed


def percentile(values, fraction):
    """Return the nearest-rank percentile of `values`, `fraction` in [0, 1]."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@dataclass
class Timing:
    total_ms: float
    decide_ms: float
    load_ms: float


def run_queries(organization, principals, connector, queries, mode, top_k, clock):
    """Return one Timing per query and the count of each decision."""
    from answers.local_openai import embed_text
    from retrieval.search import execute_retrieval

    timings, outcomes = [], {}
    for number, query in enumerate(queries):
        principal = principals[number % len(principals)]
        options = {}
        if mode != "keyword":
            options = {"query_vector": embed_text(query), "alpha": 0.5}
        clock.reset()
        started = time.perf_counter()
        result = execute_retrieval(
            organization, principal, connector, query, top_k, mode, **options
        )
        total = time.perf_counter() - started
        timings.append(
            Timing(total * 1000, clock.decide_seconds * 1000, clock.load_seconds * 1000)
        )
        outcomes[result.decision] = outcomes.get(result.decision, 0) + 1
    return timings, outcomes


def report(size, mode, timings, outcomes):
    """Print one line of figures; return (total p95, decide p95) in ms."""
    totals = [timing.total_ms for timing in timings]
    decides = [timing.decide_ms for timing in timings]
    loads = [timing.load_ms for timing in timings]
    share = (sum(decides) + sum(loads)) / sum(totals)
    print(
        f"{size:>7} chunks  {mode:<7}  p50 {percentile(totals, 0.5):6.1f} ms  "
        f"p95 {percentile(totals, 0.95):6.1f} ms  |  decide p50 "
        f"{percentile(decides, 0.5):4.2f} p95 {percentile(decides, 0.95):4.2f} ms  "
        f"load p95 {percentile(loads, 0.95):4.2f} ms  policy share {share:5.1%}  "
        f"{outcomes}"
    )
    return percentile(totals, 0.95), percentile(decides, 0.95)


def exit_on_sigterm(signal_number, frame):
    # Raising SystemExit runs the clean-up in main's finally block.
    sys.exit(f"Stopped by signal {signal_number}.")


def main():
    options = parse_options()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    postgresql_url = os.environ.get("DATABASE_URL", "")
    data_dir = tempfile.mkdtemp(prefix="gateco-bench-retrieval-")
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "gateco.settings",
            "GATECO_DATA_DIR": data_dir,
            "LOG_LEVEL": "WARNING",
        }
    )
    if postgresql_url:
        recreate_postgresql_database(postgresql_url)
        os.environ["DATABASE_URL"] = bench_database_url(postgresql_url)
    try:
        return run(options)
    finally:
        from django.db import connections

        connections.close_all()
        if postgresql_url:
            recreate_postgresql_database(postgresql_url, drop_only=True)
        shutil.rmtree(data_dir, ignore_errors=True)


def run(options):
    import django
    import numpy as np

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from retrieval.engines import bump_index_version, clear_caches
    from retrieval.vector_index import index_cache

    call_command("migrate", verbosity=0)
    rng = np.random.default_rng(options.seed)
    vocabulary = make_vocabulary(rng)
    queries = make_queries(rng, vocabulary, options.queries)
    organization, principals, connector = create_organization()
    clock = PolicyClock()

    print(
        f"database: {connection.vendor}; {len(vocabulary)} words; "
        f"{len(queries)} queries per mode; top_k {options.top_k}; "
        f"{len(policy_definitions())} active policies"
    )

    p95 = {}
    built = 0
    for size in options.sizes:
        started = time.perf_counter()
        add_chunks(connector, principals, rng, vocabulary, built, size - built)
        built = size
        bump_index_version(connector)
        if connection.vendor == "postgresql":
            # Autovacuum would do this a while after a bulk load. Without the
            # statistics the planner picked plans that took seconds, and the
            # GIN index's pending list is scanned linearly until vacuumed.
            with connection.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE retrieval_chunk")
                cursor.execute("VACUUM ANALYZE retrieval_resource")
        loaded = time.perf_counter() - started
        print(f"{size:>7} chunks  loaded in {loaded:.1f} s")
        time_search_engines(size, connector, queries)
        for mode in MODES:
            # The first few queries warm the database cache; they are not timed.
            run_queries(
                organization,
                principals,
                connector,
                queries[-5:],
                mode,
                options.top_k,
                clock,
            )
            clear_caches()
            index_cache.get(connector)
            timings, outcomes = run_queries(
                organization, principals, connector, queries, mode, options.top_k, clock
            )
            p95[size, mode] = report(size, mode, timings, outcomes)

    return check_targets(options.sizes, p95)


def time_search_engines(size, connector, queries):
    """Print the vector index's build time, and the time of each ranking alone.

    Both rankings go FIRST_DEPTH deep, as the first page of a search does,
    without loading chunks or deciding policies.
    """
    from answers.local_openai import embed_text
    from retrieval.engines import FIRST_DEPTH, clear_caches
    from retrieval.fulltext import query_terms, rank_by_keywords
    from retrieval.vector_index import index_cache

    clear_caches()
    started = time.perf_counter()
    index = index_cache.get(connector)
    built_ms = (time.perf_counter() - started) * 1000
    nearest_ms, keyword_ms, matched = [], [], []
    for query in queries:
        vector = embed_text(query)
        started = time.perf_counter()
        index.nearest(vector, FIRST_DEPTH)
        nearest_ms.append((time.perf_counter() - started) * 1000)
        terms = query_terms(query)
        started = time.perf_counter()
        rank_by_keywords(connector, terms, FIRST_DEPTH)
        keyword_ms.append((time.perf_counter() - started) * 1000)
        matched.append(count_keyword_matches(terms) / size)
    print(
        f"{size:>7} chunks  vector index built in {built_ms:.0f} ms; nearest "
        f"{FIRST_DEPTH} p50 {percentile(nearest_ms, 0.5):.1f} p95 "
        f"{percentile(nearest_ms, 0.95):.1f} ms; keyword ranking p50 "
        f"{percentile(keyword_ms, 0.5):.1f} p95 {percentile(keyword_ms, 0.95):.1f} "
        f"ms; chunks matched p50 {percentile(matched, 0.5):.0%} p95 "
        f"{percentile(matched, 0.95):.0%}"
    )


def count_keyword_matches(terms):
    """Return how many chunks contain any of `terms`, the rows a ranking scores."""
    from django.db import connection

    if not terms:
        return 0
    if connection.vendor == "sqlite":
        sql = (
            "SELECT count(*) FROM retrieval_chunk_fts "
            "WHERE retrieval_chunk_fts MATCH %s"
        )
        match = " OR ".join(f'"{term}"' for term in terms)
    else:
        sql = (
            "SELECT count(*) FROM retrieval_chunk "
            "WHERE search_vector @@ to_tsquery('english', %s)"
        )
        match = " | ".join(f"'{term}'" for term in terms)
    with connection.cursor() as cursor:
        cursor.execute(sql, [match])
        return cursor.fetchone()[0]


def check_targets(sizes, p95):
    failed = False
    smallest, largest = sizes[0], sizes[-1]
    print()
    for (size, mode), (_, policy_p95) in p95.items():
        holds = policy_p95 < POLICY_P95_TARGET_MS
        failed |= not holds
        print(
            f"{'PASS' if holds else 'FAIL'}: policy decisions p95 {policy_p95:.2f} ms "
            f"< {POLICY_P95_TARGET_MS} ms ({mode}, {size} chunks)"
        )
    if largest != smallest:
        for mode in MODES:
            ratio = p95[largest, mode][0] / p95[smallest, mode][0]
            holds = ratio <= SCALING_TARGET
            failed |= not holds
            print(
                f"{'PASS' if holds else 'FAIL'}: {mode} p95 at {largest} chunks is "
                f"{ratio:.2f}x p95 at {smallest} (target <= {SCALING_TARGET}x)"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
