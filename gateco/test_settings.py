"""Settings for the test suite: the normal settings with throwaway secrets."""

import base64
import os
import tempfile

os.environ.setdefault("GATECO_DATA_DIR", tempfile.mkdtemp(prefix="gateco-test-"))

from .settings import *  # noqa: E402,F403

GATECO_LOCAL_KEK = base64.b64encode(os.urandom(32)).decode()
# The fast hasher: password strength is not under test.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
OPENAI_API_KEY = ""
OPENAI_BASE_URL = None
GATECO_LLM_TIMEOUT_SECONDS = 5.0
