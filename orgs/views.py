import logging

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.shortcuts import redirect, render
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables
from rest_framework import exceptions, serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from answers import llm
from gateco.errors import ApiError
from keyvault.forms import MASKED_KEY, LlmApiKeyForm, validate_llm_api_key
from keyvault.vault import (
    SecretUnavailable,
    clear_llm_api_key,
    llm_api_key_row,
    set_llm_api_key,
)

from .access import membership_for_user, organization_for_request
from .authentication import ApiKeyUser

logger = logging.getLogger(__name__)


class KeyServiceFailed(ApiError):
    status_code = 503
    code = "KEY_UNAVAILABLE"
    default_message = "The key service failed, so the key was not saved. Retry later."


class LlmKeyRejected(ApiError):
    status_code = 422
    code = "LLM_KEY_INVALID"
    default_message = (
        "OpenAI rejected this API key (401 or 403), so it was not saved. Check "
        "that you copied the whole key and that it has not been revoked."
    )


UNVERIFIED_WARNING = (
    "OpenAI could not be reached to check this key, so it was saved unverified. "
    "Answers will show whether it works."
)


@sensitive_variables("value")
def check_new_llm_api_key(organization, value):
    """Check a new key with OpenAI; raise LlmKeyRejected if OpenAI rejects it.

    Call it before opening a transaction, so no lock is held while waiting
    for OpenAI. Returns the KeyCheck result to store with the key.
    """
    check = llm.check_api_key(value)
    if check == llm.KeyCheck.INVALID:
        logger.info("Rejected a new LLM key for organization %s", organization.pk)
        raise LlmKeyRejected()
    return check


@sensitive_variables("value")
def store_llm_api_key(organization, value, check):
    """Store a checked key and reset the use count; call inside a transaction."""
    set_llm_api_key(organization, value, check_status=check)
    organization.llm_key_uses = 0
    organization.save(update_fields=["llm_key_uses"])


@sensitive_variables("value")
def replace_llm_api_key(organization, value):
    """Check a new key with OpenAI, then store it; return the check result."""
    check = check_new_llm_api_key(organization, value)
    with transaction.atomic():
        store_llm_api_key(organization, value, check)
    return check


def remove_llm_api_key(organization):
    with transaction.atomic():
        return clear_llm_api_key(organization)


class OrganizationSettingsSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False)
    llm_api_key = serializers.CharField(
        required=False, write_only=True, trim_whitespace=True, max_length=400
    )
    clear_llm_api_key = serializers.BooleanField(required=False, default=False)
    # -1 or null removes the cap, as the SDK documents.
    llm_key_query_cap = serializers.IntegerField(
        required=False, allow_null=True, min_value=-1, max_value=1_000_000_000
    )

    def validate_llm_api_key(self, value):
        if MASKED_KEY.fullmatch(value):
            return ""
        try:
            validate_llm_api_key(value)
        except DjangoValidationError as error:
            raise serializers.ValidationError(error.messages[0]) from None
        return value

    def validate(self, attrs):
        if attrs.get("llm_api_key") and attrs.get("clear_llm_api_key"):
            raise serializers.ValidationError(
                "Send either llm_api_key or clear_llm_api_key, not both."
            )
        return attrs


def settings_body(organization):
    row = llm_api_key_row(organization)
    configured, last_four = row is not None, row.last_four if row else ""
    return {
        "id": str(organization.id),
        "name": organization.name,
        "slug": organization.slug,
        "plan": organization.tier,
        "llm_provider": "openai",
        "llm_api_key_configured": configured,
        "llm_api_key_last_four": last_four or None,
        "llm_api_key_check": row.check_status or None if row else None,
        "llm_fallback_credits_used": organization.fallback_calls_used,
        "llm_fallback_credits_limit": organization.fallback_call_limit,
        "llm_key_uses": organization.llm_key_uses,
        "llm_key_query_cap": organization.llm_key_query_cap,
    }


@method_decorator(sensitive_post_parameters("llm_api_key"), name="dispatch")
class OrganizationSettingsView(APIView):
    """Organization settings: read them, or change the name and the LLM key.

    The key is write-only: responses tell whether one is set and give its last
    four characters, never more.
    """

    serializer_class = OrganizationSettingsSerializer

    def get(self, request):
        return Response(settings_body(organization_for_request(request)))

    @method_decorator(sensitive_variables())
    def patch(self, request):
        organization = organization_for_request(request)
        require_manager(request)
        serializer = OrganizationSettingsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data

        new_key = data.get("llm_api_key")
        warnings = []
        if new_key:
            check = check_new_llm_api_key(organization, new_key)
            if check == llm.KeyCheck.UNVERIFIED:
                warnings.append(UNVERIFIED_WARNING)

        # Every change lands in one transaction, so a failure leaves none.
        try:
            with transaction.atomic():
                if new_key:
                    store_llm_api_key(organization, new_key, check)
                elif data.get("clear_llm_api_key"):
                    clear_llm_api_key(organization)
                self.apply_fields(organization, data)
        except SecretUnavailable as error:
            logger.error("%s", error)
            raise KeyServiceFailed() from None

        organization.refresh_from_db()
        return Response({**settings_body(organization), "warnings": warnings})

    def apply_fields(self, organization, data):
        changed = []
        if "name" in data:
            organization.name = data["name"]
            changed.append("name")
        if "llm_key_query_cap" in data:
            cap = data["llm_key_query_cap"]
            organization.llm_key_query_cap = None if cap in (None, -1) else cap
            changed.append("llm_key_query_cap")
        if changed:
            organization.save(update_fields=changed)


def require_manager(request):
    """Allow API keys and signed-in owners or admins; members get 403."""
    if isinstance(request.user, ApiKeyUser):
        return
    membership = membership_for_user(request.user)
    if membership is None or not membership.can_manage:
        raise exceptions.PermissionDenied("Only organization owners and admins can do this.")


@login_required
@sensitive_post_parameters("llm_api_key")
@sensitive_variables("form")
def api_keys_page(request):
    """Organization Settings → API Keys → LLM API Key."""
    membership = membership_for_user(request.user)
    if membership is None:
        raise PermissionDenied("You are not a member of any organization.")
    organization = membership.organization

    form = LlmApiKeyForm()
    if request.method == "POST":
        if not membership.can_manage:
            raise PermissionDenied("Only organization owners and admins can change keys.")
        form = LlmApiKeyForm(request.POST)
        if form.is_valid():
            handle_key_form(request, organization, form.cleaned_data["llm_api_key"])
            return redirect("orgs:api-keys")

    row = llm_api_key_row(organization)
    return render(
        request,
        "orgs/api_keys.html",
        {
            "organization": organization,
            "membership": membership,
            "form": form,
            "key_configured": row is not None,
            "key_last_four": row.last_four if row else "",
            "key_unverified": row is not None and row.check_status == llm.KeyCheck.UNVERIFIED,
        },
    )


@sensitive_variables("new_key")
def handle_key_form(request, organization, new_key):
    try:
        if request.POST.get("action") == "remove":
            removed = remove_llm_api_key(organization)
            if removed:
                messages.success(request, "The LLM API key was removed.")
            else:
                messages.info(request, "No LLM API key was set.")
        elif new_key:
            check = replace_llm_api_key(organization, new_key)
            messages.success(
                request, f"The LLM API key ending in {new_key[-4:]} was saved."
            )
            if check == llm.KeyCheck.UNVERIFIED:
                messages.warning(request, UNVERIFIED_WARNING)
        else:
            messages.info(request, "No new key was entered; the stored key is unchanged.")
    except LlmKeyRejected as error:
        messages.error(request, error.message)
    except SecretUnavailable as error:
        logger.error("%s", error)
        messages.error(request, "The key service failed, so nothing was changed. Retry later.")
