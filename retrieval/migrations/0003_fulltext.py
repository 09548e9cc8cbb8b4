"""Add a full-text index over chunk text, in the database's own engine.

SQLite gets an FTS5 table, `retrieval_chunk_fts`, that reads its text from
`retrieval_chunk` (external content) and is kept in step by triggers. It is
keyed on the chunk table's implicit integer rowid, because the UUID primary
key cannot serve as an FTS5 rowid.

PostgreSQL gets a stored generated column, `retrieval_chunk.search_vector`,
with the english text-search configuration, and a GIN index on it.

Both are built from the existing rows here. Other databases get no index, and
keyword search on them raises SearchUnavailable.

NOTE: on SQLite, a later migration that makes Django remake retrieval_chunk
(most AlterField operations do) drops these triggers and may renumber the
rowids. Such a migration must recreate the triggers and rebuild the index,
as `retrieval.engines.rebuild_fulltext_index()` does. VACUUM can renumber the
rowids as well, so run that function after a VACUUM.
"""

from django.db import migrations

SQLITE_FORWARD = [
    # porter stems English words, as PostgreSQL's english configuration does,
    # so "refunds" finds "refund" on both databases. remove_diacritics 2 folds
    # accented letters, so "cafe" finds "café".
    """
    CREATE VIRTUAL TABLE retrieval_chunk_fts USING fts5(
        text,
        content='retrieval_chunk',
        tokenize='porter unicode61 remove_diacritics 2'
    )
    """,
    """
    CREATE TRIGGER retrieval_chunk_fts_insert AFTER INSERT ON retrieval_chunk
    BEGIN
        INSERT INTO retrieval_chunk_fts (rowid, text) VALUES (new.rowid, new.text);
    END
    """,
    # An external-content FTS5 table deletes a row by being given the old
    # text, which must equal what was indexed.
    """
    CREATE TRIGGER retrieval_chunk_fts_delete AFTER DELETE ON retrieval_chunk
    BEGIN
        INSERT INTO retrieval_chunk_fts (retrieval_chunk_fts, rowid, text)
        VALUES ('delete', old.rowid, old.text);
    END
    """,
    """
    CREATE TRIGGER retrieval_chunk_fts_update AFTER UPDATE OF text ON retrieval_chunk
    BEGIN
        INSERT INTO retrieval_chunk_fts (retrieval_chunk_fts, rowid, text)
        VALUES ('delete', old.rowid, old.text);
        INSERT INTO retrieval_chunk_fts (rowid, text) VALUES (new.rowid, new.text);
    END
    """,
    # Index the rows that exist already.
    "INSERT INTO retrieval_chunk_fts (retrieval_chunk_fts) VALUES ('rebuild')",
]
SQLITE_BACKWARD = [
    "DROP TRIGGER IF EXISTS retrieval_chunk_fts_update",
    "DROP TRIGGER IF EXISTS retrieval_chunk_fts_delete",
    "DROP TRIGGER IF EXISTS retrieval_chunk_fts_insert",
    "DROP TABLE IF EXISTS retrieval_chunk_fts",
]

POSTGRESQL_FORWARD = [
    # Adding a stored generated column rewrites the table and computes the
    # value for every existing row, so no separate backfill is needed.
    """
    ALTER TABLE retrieval_chunk ADD COLUMN search_vector tsvector
        GENERATED ALWAYS AS (to_tsvector('english'::regconfig, text)) STORED
    """,
    """
    CREATE INDEX retrieval_chunk_search_vector
        ON retrieval_chunk USING GIN (search_vector)
    """,
]
POSTGRESQL_BACKWARD = [
    "DROP INDEX IF EXISTS retrieval_chunk_search_vector",
    "ALTER TABLE retrieval_chunk DROP COLUMN IF EXISTS search_vector",
]


def run_statements(schema_editor, by_vendor):
    for statement in by_vendor.get(schema_editor.connection.vendor, []):
        schema_editor.execute(statement)


def add_fulltext_index(apps, schema_editor):
    run_statements(
        schema_editor, {"sqlite": SQLITE_FORWARD, "postgresql": POSTGRESQL_FORWARD}
    )


def remove_fulltext_index(apps, schema_editor):
    run_statements(
        schema_editor, {"sqlite": SQLITE_BACKWARD, "postgresql": POSTGRESQL_BACKWARD}
    )


class Migration(migrations.Migration):
    dependencies = [
        ("retrieval", "0002_policy_depth_and_audit"),
    ]

    operations = [
        migrations.RunPython(add_fulltext_index, remove_fulltext_index),
    ]
