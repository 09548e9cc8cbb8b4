"""Database helpers shared by the apps."""

import threading
from contextlib import contextmanager

from django.db import connection, transaction

# SQLite lets one transaction write at a time anyway, and in the shared-cache
# in-memory database of the test suite a second writer fails at once with
# "database table is locked" instead of waiting. So this process runs its
# retrieval transactions on SQLite one at a time. PostgreSQL needs no lock.
_sqlite_write_lock = threading.Lock()


@contextmanager
def serialized_atomic():
    """Run the block in `transaction.atomic()`, one thread at a time on SQLite."""
    if connection.vendor == "sqlite":
        with _sqlite_write_lock, transaction.atomic():
            yield
    else:
        with transaction.atomic():
            yield
