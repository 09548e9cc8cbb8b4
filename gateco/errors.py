"""The one error shape of the Gateco API.

Every error response has the body `{"error": {"code": ..., "message": ...}}`,
sometimes with more keys beside `error` (the allowed chunks when synthesis is
skipped, for example). `code` is stable and is what clients branch on; the
`gateco` SDK maps it to its typed exceptions.
"""

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions as drf_exceptions
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A failure with an HTTP status, a stable code and a user-facing message."""

    status_code = status.HTTP_400_BAD_REQUEST
    code = "BAD_REQUEST"
    default_message = "The request failed."

    def __init__(self, message=None, *, extra=None, headers=None):
        self.message = message or self.default_message
        self.extra = extra or {}
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self):
        return {"error": {"code": self.code, "message": self.message}, **self.extra}


class ValidationFailed(ApiError):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    code = "VALIDATION_ERROR"
    default_message = "The request is invalid."


class EntitlementRequired(ApiError):
    """The organization's plan lacks a feature or has used up a quota.

    `reason` and `upgrade_to` go inside the `error` object, where the `gateco`
    SDK's EntitlementError reads them.
    """

    status_code = status.HTTP_403_FORBIDDEN
    code = "ENTITLEMENT_REQUIRED"
    default_message = "Your plan does not include this."
    FEATURE = "feature_not_in_plan"
    LIMIT = "resource_limit_reached"

    def __init__(self, message=None, *, reason, upgrade_to=None, **kwargs):
        super().__init__(message, **kwargs)
        self.reason = reason
        self.upgrade_to = upgrade_to

    def body(self):
        body = super().body()
        body["error"]["reason"] = self.reason
        if self.upgrade_to:
            body["error"]["upgrade_to"] = self.upgrade_to
        return body


class NotFound(ApiError):
    status_code = status.HTTP_404_NOT_FOUND
    code = "RESOURCE_NOT_FOUND"
    default_message = "Not found."


# DRF's own exceptions keep their status; these are their stable codes.
DRF_CODES = {
    drf_exceptions.NotAuthenticated: "AUTH_INVALID_CREDENTIALS",
    drf_exceptions.AuthenticationFailed: "AUTH_INVALID_CREDENTIALS",
    drf_exceptions.PermissionDenied: "AUTH_PERMISSION_DENIED",
    drf_exceptions.NotFound: "RESOURCE_NOT_FOUND",
    drf_exceptions.MethodNotAllowed: "METHOD_NOT_ALLOWED",
    drf_exceptions.NotAcceptable: "NOT_ACCEPTABLE",
    drf_exceptions.UnsupportedMediaType: "UNSUPPORTED_MEDIA_TYPE",
    drf_exceptions.Throttled: "RATE_LIMIT_EXCEEDED",
}


class RequestTooLarge(ApiError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    code = "REQUEST_TOO_LARGE"
    default_message = (
        "The request body is larger than the server accepts "
        "(DATA_UPLOAD_MAX_MEMORY_SIZE); send less data per request."
    )


def api_exception_handler(exc, context):
    """Render ApiError and DRF exceptions in the one error shape."""
    # Django's own exceptions, which DRF would convert inside its handler only.
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge()

    if isinstance(exc, ApiError):
        return Response(exc.body(), status=exc.status_code, headers=exc.headers)

    if isinstance(exc, (drf_exceptions.ValidationError, drf_exceptions.ParseError)):
        # Validation failures are 422, as in the public Gateco API.
        error = ValidationFailed(
            _first_message(exc.detail), extra={"fields": _field_errors(exc.detail)}
        )
        return Response(error.body(), status=error.status_code)

    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    code = next(
        (code for cls, code in DRF_CODES.items() if isinstance(exc, cls)),
        "REQUEST_FAILED",
    )
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    response.data = {"error": {"code": code, "message": message}}
    return response


def _field_errors(detail):
    if isinstance(detail, dict):
        return {
            field: [str(message) for message in messages]
            if isinstance(messages, list)
            else str(messages)
            for field, messages in detail.items()
        }
    return {}


def _first_message(detail):
    if isinstance(detail, dict):
        field, messages = next(iter(detail.items()))
        first = messages[0] if isinstance(messages, list) else messages
        if field == "non_field_errors":
            return str(first)
        return f"{field}: {first}"
    if isinstance(detail, list):
        return str(detail[0]) if detail else "The request is invalid."
    return str(detail)
