import hmac
from datetime import timedelta

from django.contrib.auth.models import AnonymousUser
from django.utils import timezone
from rest_framework import authentication, exceptions

from .models import API_KEY_PREFIX_LENGTH, ApiKey, hash_api_key

LAST_USED_PRECISION = timedelta(minutes=1)


class ApiKeyUser(AnonymousUser):
    """The request user for an API-key client: authenticated, but no person."""

    def __init__(self, api_key):
        self.api_key = api_key

    @property
    def is_authenticated(self):
        return True

    @property
    def is_anonymous(self):
        return False

    def __str__(self):
        return f"api_key:{self.api_key.prefix}"


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """Authenticate API clients by the organization key in `X-API-Key`."""

    header = "HTTP_X_API_KEY"

    def authenticate(self, request):
        raw_key = request.META.get(self.header)
        if not raw_key:
            return None

        api_key = (
            ApiKey.objects.select_related("organization")
            .filter(prefix=raw_key[:API_KEY_PREFIX_LENGTH], revoked_at__isnull=True)
            .first()
        )
        if api_key is None or not hmac.compare_digest(
            api_key.digest, hash_api_key(raw_key)
        ):
            raise exceptions.AuthenticationFailed("The API key is invalid or revoked.")

        # Record use at most once a minute, so busy clients do not turn every
        # request into a write.
        now = timezone.now()
        last_used = api_key.last_used_at
        if last_used is None or now - last_used > LAST_USED_PRECISION:
            ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        return ApiKeyUser(api_key), api_key

    def authenticate_header(self, request):
        return "X-API-Key"
