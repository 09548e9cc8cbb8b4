"""Celery application for Gateco.

With `REDIS_URL` unset, tasks run eagerly inside the calling process, so the
embedded default needs no broker and no worker.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateco.settings")

app = Celery("gateco")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
