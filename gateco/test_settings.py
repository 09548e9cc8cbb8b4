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
# A closed loopback port, so no test reaches OpenAI by accident; tests that
# synthesize point this at the local OpenAI server.
OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
GATECO_KEY_CHECK_TIMEOUT_SECONDS = 1.0
GATECO_LLM_TIMEOUT_SECONDS = 5.0
