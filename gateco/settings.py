"""Settings for Gateco, read from the environment through django-environ.

With nothing set, Gateco runs as the embedded default: SQLite, the local key
service and eager Celery, with its state under `GATECO_DATA_DIR` (default
`./var`). Setting `DATABASE_URL`, `REDIS_URL` and `GATECO_KMS_KEY_ID` moves it
onto PostgreSQL, Redis and AWS KMS. `GATECO_ENV=production` turns every
missing secret into a startup error instead of a generated file.
"""

import os
import secrets
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

GATECO_ENV = env.str("GATECO_ENV", default="embedded")
if GATECO_ENV not in ("embedded", "production"):
    raise ImproperlyConfigured(
        f"GATECO_ENV={GATECO_ENV!r} is invalid: use 'embedded' or 'production'."
    )
PRODUCTION = GATECO_ENV == "production"

DATA_DIR = Path(env.str("GATECO_DATA_DIR", default=str(BASE_DIR / "var")))
if not PRODUCTION:
    # Owner-only: the folder contains the database, SECRET_KEY and the local KEK.
    DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)


def read_or_create_secret_file(path, length):
    """Return the hex secret stored at `path`, creating it owner-only if missing.

    The file is created with O_EXCL and mode 0600, so two processes starting at
    once cannot both write it, and no other user can read it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(length))
    return path.read_text().strip()


def read_secret_setting(name):
    """Return the secret in `name` or in the file named by `name_FILE`, or ''."""
    file_name = env.str(f"{name}_FILE", default="")
    if file_name:
        return Path(file_name).read_text().strip()
    return env.str(name, default="")


SECRET_KEY = read_secret_setting("SECRET_KEY")
if not SECRET_KEY:
    if PRODUCTION:
        raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) is missing.")
    SECRET_KEY = read_or_create_secret_file(DATA_DIR / "secret-key", 50)

DEBUG = env.bool("DEBUG", default=False)
DEFAULT_EXCEPTION_REPORTER_FILTER = "gateco.reporting.AlwaysSafeExceptionReporterFilter"
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "orgs",
    "keyvault",
    "retrieval",
    "answers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gateco.urls"
WSGI_APPLICATION = "gateco.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db(
        "DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'gateco.sqlite3'}"
    ),
}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several gunicorn workers share the file: wait for a writer to finish
    # instead of failing with "database is locked" after Python's default 5 s.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("timeout", 20)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
if not PRODUCTION:
    STATIC_ROOT.mkdir(exist_ok=True)
WHITENOISE_USE_FINDERS = True

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "orgs:api-keys"
LOGOUT_REDIRECT_URL = "login"

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=PRODUCTION)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=PRODUCTION)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "orgs.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "EXCEPTION_HANDLER": "gateco.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # Escape non-ASCII in JSON responses, so an echoed lone surrogate from a
    # request cannot break the UTF-8 encoding of an error response.
    "UNICODE_JSON": False,
    "DEFAULT_PARSER_CLASSES": [
        "gateco.parsers.BoundedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
}

# Celery: eager without a broker, so the embedded default needs no worker.
REDIS_URL = env.str("REDIS_URL", default="")
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = REDIS_URL or None
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]

# Key service. "local" wraps data keys with a 256-bit key-encryption key from
# GATECO_LOCAL_KEK (base64) or from a file created on first run. "aws" calls
# AWS KMS through boto3, which also reads AWS_ENDPOINT_URL_KMS; the region
# comes from AWS_REGION or AWS_DEFAULT_REGION.
GATECO_KMS_KEY_ID = env.str("GATECO_KMS_KEY_ID", default="")
GATECO_KMS_BACKEND = env.str(
    "GATECO_KMS_BACKEND", default="aws" if GATECO_KMS_KEY_ID else "local"
)
if GATECO_KMS_BACKEND not in ("local", "aws"):
    raise ImproperlyConfigured(
        f"GATECO_KMS_BACKEND={GATECO_KMS_BACKEND!r} is invalid: use 'local' or 'aws'."
    )
if GATECO_KMS_BACKEND == "aws" and not GATECO_KMS_KEY_ID:
    raise ImproperlyConfigured("GATECO_KMS_BACKEND=aws needs GATECO_KMS_KEY_ID.")
GATECO_KMS_REGION = env.str(
    "AWS_REGION", default=env.str("AWS_DEFAULT_REGION", default="")
)
GATECO_LOCAL_KEK = read_secret_setting("GATECO_LOCAL_KEK")
GATECO_LOCAL_KEK_DEFAULT_FILE = DATA_DIR / "local-kek.key"
# Earlier local key-encryption keys (comma-separated base64), kept only so
# `manage.py rewrap_data_keys` can move data keys to the current one.
GATECO_LOCAL_KEK_PREVIOUS = env.list("GATECO_LOCAL_KEK_PREVIOUS", default=[])
if GATECO_KMS_BACKEND == "local" and PRODUCTION and not GATECO_LOCAL_KEK:
    raise ImproperlyConfigured(
        "GATECO_ENV=production with the local key service needs GATECO_LOCAL_KEK "
        "(or GATECO_LOCAL_KEK_FILE): a base64-encoded 32-byte key."
    )
# Unwrapped data keys stay in process memory for at most this many seconds.
GATECO_DATA_KEY_CACHE_SECONDS = env.int("GATECO_DATA_KEY_CACHE_SECONDS", default=300)

# Answer synthesis. OPENAI_API_KEY is the platform's shared key, used only for
# the fallback calls of paid tiers; organizations bring their own key.
OPENAI_API_KEY = read_secret_setting("OPENAI_API_KEY")
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="") or None
GATECO_ANSWER_MODEL = env.str("GATECO_ANSWER_MODEL", default="gpt-4o-mini")
GATECO_LLM_TIMEOUT_SECONDS = env.float("GATECO_LLM_TIMEOUT_SECONDS", default=30.0)
# A new key is checked against OpenAI's model list when it is saved.
GATECO_KEY_CHECK_TIMEOUT_SECONDS = env.float(
    "GATECO_KEY_CHECK_TIMEOUT_SECONDS", default=5.0
)
GATECO_FALLBACK_CALL_LIMIT = env.int("GATECO_FALLBACK_CALL_LIMIT", default=100)

# Time in milliseconds that policy evaluation may take per retrieval. Past it,
# the whole retrieval is denied (decision error_deny), never allowed.
GATECO_POLICY_TIME_BUDGET_MS = env.int("GATECO_POLICY_TIME_BUDGET_MS", default=50)
if GATECO_POLICY_TIME_BUDGET_MS < 0:
    raise ImproperlyConfigured(
        f"GATECO_POLICY_TIME_BUDGET_MS={GATECO_POLICY_TIME_BUDGET_MS} is invalid: "
        "use 0 or more milliseconds."
    )

# Embeddings for vector search, made with the organization's own key.
GATECO_EMBEDDING_MODEL = env.str(
    "GATECO_EMBEDDING_MODEL", default="text-embedding-3-small"
)
# Length of the vectors requested from the embeddings API, or 0 for the
# model's own length (1,536 for text-embedding-3-small). Each process keeps
# chunks x length float32 values per searched connector in memory, so at 256
# an index of 100,000 chunks takes about 100 MB.
GATECO_EMBEDDING_DIMENSIONS = env.int("GATECO_EMBEDDING_DIMENSIONS", default=256)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        # httpx logs each request URL at INFO; keep it quiet by default.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        # botocore logs raw KMS responses, which hold plaintext data keys, at
        # DEBUG; keyvault.kms also filters those records out.
        "botocore": {"level": "INFO"},
    },
}
