"""The API Keys page, the Django admin and the organization settings API.

Page tests use Django's test client, so they run the real views, forms,
templates and key vault, with no server.
"""

import pytest
from django.views.decorators.debug import sensitive_variables
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from keyvault.models import Purpose, Secret
from keyvault.vault import get_llm_api_key, set_llm_api_key
from orgs.models import Organization, Tier

from .helpers import make_user

PAGE_URL = "/settings/api-keys/"
SETTINGS_URL = "/api/organization/settings"
FIRST_KEY = "sk-page-first-key-3333333333333333333PG01"
SECOND_KEY = "sk-page-second-key-444444444444444444PG02"

pytestmark = pytest.mark.django_db


def page_text(response):
    """Return the decoded HTML with each run of whitespace as one space."""
    return " ".join(response.content.decode().split())


def save_key(client, value, action="save"):
    return client.post(PAGE_URL, {"llm_api_key": value, "action": action}, follow=True)


def stored_key(organization):
    secret = get_llm_api_key(organization)
    return None if secret is None else secret.reveal()


def llm_secrets(organization):
    return Secret.objects.filter(organization=organization, purpose=Purpose.LLM_API_KEY)


def changelist_row(html, name):
    """Return the admin changelist table row whose link text is `name`."""
    [row] = [row for row in html.split("<tr") if f">{name}</a>" in row]
    return row


@pytest.fixture
def owner_client(client, owner):
    client.force_login(owner)
    return client


@pytest.fixture
def superuser_client(client, db):
    superuser = make_user("root", is_staff=True, is_superuser=True)
    client.force_login(superuser)
    return client


# The API Keys page.


def test_page_url_name_resolves():
    assert reverse("orgs:api-keys") == PAGE_URL


def test_anonymous_user_is_redirected_to_login(client, demo):
    response = client.get(PAGE_URL)

    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={PAGE_URL}"


def test_owner_sees_key_not_set(owner_client):
    response = owner_client.get(PAGE_URL)

    assert response.status_code == 200
    html = page_text(response)
    assert "Not set" in html
    assert "100 of 100 fallback calls left, never renewed." in html
    assert 'name="llm_api_key"' in html


def test_fallback_line_counts_used_calls(owner_client, demo):
    Organization.objects.filter(pk=demo.organization.pk).update(fallback_calls_used=40)

    html = page_text(owner_client.get(PAGE_URL))

    assert "60 of 100 fallback calls left" in html


def test_free_tier_page_needs_own_key(owner_client, demo):
    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)

    html = page_text(owner_client.get(PAGE_URL))

    assert "The free plan has no shared key" in html
    assert "fallback calls left" not in html


def test_saved_key_shows_last_four(owner_client, demo):
    response = save_key(owner_client, FIRST_KEY)

    assert response.redirect_chain == [(PAGE_URL, 302)]
    html = page_text(response)
    assert "Set, ending in PG01" in html
    assert "The LLM API key ending in PG01 was saved." in html
    assert "fallback calls left" not in html
    assert stored_key(demo.organization) == FIRST_KEY


def test_saved_key_never_in_html(owner_client, demo):
    save_response = save_key(owner_client, FIRST_KEY)
    get_response = owner_client.get(PAGE_URL)

    for response in (save_response, get_response):
        html = response.content.decode()
        assert FIRST_KEY not in html
        assert FIRST_KEY[:-4] not in html


def test_saving_resets_own_key_uses(owner_client, demo):
    Organization.objects.filter(pk=demo.organization.pk).update(llm_key_uses=9)

    save_key(owner_client, FIRST_KEY)

    demo.organization.refresh_from_db()
    assert demo.organization.llm_key_uses == 0


def test_new_key_replaces_old(owner_client, demo):
    save_key(owner_client, FIRST_KEY)

    html = page_text(save_key(owner_client, SECOND_KEY))

    assert "Set, ending in PG02" in html
    assert "ending in PG01" not in html
    assert stored_key(demo.organization) == SECOND_KEY
    assert llm_secrets(demo.organization).count() == 1


def test_remove_deletes_secret_row(owner_client, demo):
    set_llm_api_key(demo.organization, FIRST_KEY)

    html = page_text(save_key(owner_client, "", action="remove"))

    assert not llm_secrets(demo.organization).exists()
    assert "Not set" in html
    assert "The LLM API key was removed." in html


def test_remove_without_key_shows_info(owner_client, demo):
    html = page_text(save_key(owner_client, "", action="remove"))

    assert "No LLM API key was set." in html


def test_empty_field_keeps_stored_key(owner_client, demo):
    set_llm_api_key(demo.organization, FIRST_KEY)

    html = page_text(save_key(owner_client, ""))

    assert stored_key(demo.organization) == FIRST_KEY
    assert "Set, ending in PG01" in html
    assert "the stored key is unchanged" in html


@pytest.mark.parametrize("masked", ["••••abcd", "••••PG01", "****abcd", "••••••••"])
def test_masked_value_keeps_stored_key(owner_client, demo, masked):
    set_llm_api_key(demo.organization, FIRST_KEY)

    response = save_key(owner_client, masked)

    assert response.redirect_chain == [(PAGE_URL, 302)]
    assert stored_key(demo.organization) == FIRST_KEY


@pytest.mark.parametrize(
    "invalid",
    [
        "sk-short-PGX9",
        "sk-has a space-00000000000000000000PGX9",
        "sk-has\ttab-000000000000000000000000PGX9",
        "sk-unicode-é-000000000000000000000PGX9",
    ],
)
def test_invalid_key_shows_form_error(owner_client, demo, invalid):
    response = save_key(owner_client, invalid)

    assert response.status_code == 200
    assert response.redirect_chain == []
    html = response.content.decode()
    assert "This does not look like an OpenAI API key" in html
    assert invalid not in html
    assert "PGX9" not in html
    assert not llm_secrets(demo.organization).exists()


def test_invalid_key_keeps_stored_key(owner_client, demo):
    set_llm_api_key(demo.organization, FIRST_KEY)

    save_key(owner_client, "sk-short-PGX9")

    assert stored_key(demo.organization) == FIRST_KEY


def test_member_sees_status_without_form(client, demo, member):
    set_llm_api_key(demo.organization, FIRST_KEY)
    client.force_login(member)

    response = client.get(PAGE_URL)

    assert response.status_code == 200
    html = page_text(response)
    assert "Set, ending in PG01" in html
    assert 'name="llm_api_key"' not in html
    assert "Remove key" not in html
    assert "Only organization owners and admins can change this key." in html


@pytest.mark.parametrize("action", ["save", "remove"])
def test_member_post_is_forbidden(client, demo, member, action):
    set_llm_api_key(demo.organization, FIRST_KEY)
    client.force_login(member)

    response = client.post(PAGE_URL, {"llm_api_key": SECOND_KEY, "action": action})

    assert response.status_code == 403
    assert stored_key(demo.organization) == FIRST_KEY


def test_user_without_membership_is_forbidden(client, demo):
    client.force_login(make_user("drifter"))

    assert client.get(PAGE_URL).status_code == 403
    assert client.post(PAGE_URL, {"llm_api_key": FIRST_KEY}).status_code == 403
    assert not Secret.objects.exists()


def test_page_post_needs_csrf_token(demo, owner):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)

    response = client.post(PAGE_URL, {"llm_api_key": FIRST_KEY, "action": "save"})

    assert response.status_code == 403
    assert not llm_secrets(demo.organization).exists()


def test_outsider_sees_only_own_org(client, demo, outsider, other_demo):
    set_llm_api_key(demo.organization, FIRST_KEY)
    client.force_login(outsider)

    html = page_text(client.get(PAGE_URL))

    assert "Globex" in html
    assert "Acme Health" not in html
    assert "Not set" in html
    assert "PG01" not in html


def test_outsider_save_touches_own_org(client, demo, outsider, other_demo):
    set_llm_api_key(demo.organization, FIRST_KEY)
    client.force_login(outsider)

    save_key(client, SECOND_KEY)

    assert stored_key(other_demo.organization) == SECOND_KEY
    assert stored_key(demo.organization) == FIRST_KEY


# The Django admin.


def test_admin_changelist_shows_key_status(superuser_client, demo, other_demo):
    set_llm_api_key(demo.organization, FIRST_KEY)
    Organization.objects.filter(pk=demo.organization.pk).update(fallback_calls_used=7)
    Organization.objects.filter(pk=other_demo.organization.pk).update(tier=Tier.FREE)

    response = superuser_client.get("/admin/orgs/organization/")

    assert response.status_code == 200
    html = response.content.decode()
    acme = changelist_row(html, "Acme Health")
    assert '<td class="field-tier">Team</td>' in acme
    assert '<td class="field-fallback_calls_used">7</td>' in acme
    assert '<td class="field-llm_key_status">Set (…PG01)</td>' in acme
    globex = changelist_row(html, "Globex")
    assert '<td class="field-tier">Free</td>' in globex
    assert '<td class="field-fallback_calls_used">0</td>' in globex
    assert '<td class="field-llm_key_status">Not set</td>' in globex
    assert FIRST_KEY not in html
    assert FIRST_KEY[:-4] not in html


def test_admin_change_page_hides_key(superuser_client, demo):
    set_llm_api_key(demo.organization, FIRST_KEY)

    response = superuser_client.get(
        f"/admin/orgs/organization/{demo.organization.pk}/change/"
    )

    assert response.status_code == 200
    html = response.content.decode()
    assert "Set (…PG01)" in html
    assert FIRST_KEY not in html
    assert FIRST_KEY[:-4] not in html


def test_admin_requires_staff(owner_client):
    response = owner_client.get("/admin/orgs/organization/")

    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


# The DRF browsable API.


def test_browsable_api_renders_html(owner_client, demo):
    set_llm_api_key(demo.organization, FIRST_KEY)

    response = owner_client.get(SETTINGS_URL, HTTP_ACCEPT="text/html")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert "&quot;llm_api_key_configured&quot;: true" in html
    assert "&quot;llm_api_key_last_four&quot;: &quot;PG01&quot;" in html
    assert FIRST_KEY not in html
    assert FIRST_KEY[:-4] not in html


@pytest.mark.parametrize("value", [FIRST_KEY, "sk-short-PGX9"])
def test_browsable_patch_hides_key(owner_client, demo, value):
    response = owner_client.patch(
        SETTINGS_URL,
        {"llm_api_key": value},
        content_type="application/json",
        HTTP_ACCEPT="text/html",
    )

    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert value not in html
    assert value[:-4] not in html


# The organization settings API.


def test_settings_without_key(api_client, demo):
    response = api_client.get(SETTINGS_URL)

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(demo.organization.id)
    assert body["plan"] == "team"
    assert body["llm_api_key_configured"] is False
    assert body["llm_api_key_last_four"] is None
    assert body["llm_fallback_credits_used"] == 0
    assert body["llm_fallback_credits_limit"] == 100
    assert body["llm_key_uses"] == 0


def test_settings_with_key_and_usage(api_client, demo):
    set_llm_api_key(demo.organization, FIRST_KEY)
    Organization.objects.filter(pk=demo.organization.pk).update(
        fallback_calls_used=12, llm_key_uses=3
    )

    body = api_client.get(SETTINGS_URL).json()

    assert body["llm_api_key_configured"] is True
    assert body["llm_api_key_last_four"] == "PG01"
    assert body["llm_fallback_credits_used"] == 12
    assert body["llm_key_uses"] == 3


def test_free_tier_credit_limit_zero(api_client, demo):
    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)

    body = api_client.get(SETTINGS_URL).json()

    assert body["plan"] == "free"
    assert body["llm_fallback_credits_limit"] == 0


def test_patch_key_stores_it(api_client, demo):
    Organization.objects.filter(pk=demo.organization.pk).update(llm_key_uses=5)

    response = api_client.patch(SETTINGS_URL, {"llm_api_key": FIRST_KEY}, format="json")

    assert response.status_code == 200
    assert FIRST_KEY not in response.content.decode()
    assert FIRST_KEY[:-4] not in response.content.decode()
    body = response.json()
    assert "llm_api_key" not in body
    assert body["llm_api_key_configured"] is True
    assert body["llm_api_key_last_four"] == "PG01"
    assert body["llm_key_uses"] == 0
    assert stored_key(demo.organization) == FIRST_KEY


def test_patch_clear_removes_key(api_client, demo):
    set_llm_api_key(demo.organization, FIRST_KEY)

    response = api_client.patch(SETTINGS_URL, {"clear_llm_api_key": True}, format="json")

    assert response.status_code == 200
    assert response.json()["llm_api_key_configured"] is False
    assert not llm_secrets(demo.organization).exists()


def test_patch_key_and_clear_is_422(api_client, demo):
    set_llm_api_key(demo.organization, FIRST_KEY)

    response = api_client.patch(
        SETTINGS_URL,
        {"llm_api_key": SECOND_KEY, "clear_llm_api_key": True},
        format="json",
    )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert SECOND_KEY not in response.content.decode()
    assert stored_key(demo.organization) == FIRST_KEY


@pytest.mark.parametrize("invalid", ["sk-short-PGX9", "sk-has a space-0000000000000PGX9"])
def test_patch_invalid_key_is_422(api_client, demo, invalid):
    response = api_client.patch(SETTINGS_URL, {"llm_api_key": invalid}, format="json")

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert "PGX9" not in response.content.decode()
    assert not llm_secrets(demo.organization).exists()


def test_patch_masked_key_keeps_key(api_client, demo):
    set_llm_api_key(demo.organization, FIRST_KEY)

    response = api_client.patch(SETTINGS_URL, {"llm_api_key": "••••PG01"}, format="json")

    assert response.status_code == 200
    assert stored_key(demo.organization) == FIRST_KEY


def test_owner_session_patch_allowed(owner_client, demo):
    response = owner_client.patch(
        SETTINGS_URL, {"llm_api_key": FIRST_KEY}, content_type="application/json"
    )

    assert response.status_code == 200
    assert stored_key(demo.organization) == FIRST_KEY


def test_session_patch_needs_csrf_token(demo, owner):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(owner)

    response = client.patch(SETTINGS_URL, {"llm_api_key": FIRST_KEY}, format="json")

    assert response.status_code == 403
    assert not llm_secrets(demo.organization).exists()


def test_member_session_get_allowed(client, demo, member):
    client.force_login(member)

    response = client.get(SETTINGS_URL)

    assert response.status_code == 200
    assert response.json()["id"] == str(demo.organization.id)


def test_member_session_patch_forbidden(client, demo, member):
    client.force_login(member)

    response = client.patch(
        SETTINGS_URL, {"llm_api_key": FIRST_KEY}, content_type="application/json"
    )

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "AUTH_PERMISSION_DENIED"
    assert not llm_secrets(demo.organization).exists()


def test_member_session_clear_forbidden(client, demo, member):
    set_llm_api_key(demo.organization, FIRST_KEY)
    client.force_login(member)

    response = client.patch(
        SETTINGS_URL, {"clear_llm_api_key": True}, content_type="application/json"
    )

    assert response.status_code == 403
    assert stored_key(demo.organization) == FIRST_KEY


def test_anonymous_settings_request_is_401(client, demo):
    response = client.get(SETTINGS_URL)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "AUTH_INVALID_CREDENTIALS"


def test_session_without_membership_is_403(client, demo):
    client.force_login(make_user("drifter"))

    response = client.get(SETTINGS_URL)

    assert response.status_code == 403


def test_outsider_api_sees_own_org(outsider_api_client, demo, other_demo):
    set_llm_api_key(demo.organization, FIRST_KEY)

    body = outsider_api_client.get(SETTINGS_URL).json()

    assert body["id"] == str(other_demo.organization.id)
    assert body["name"] == "Globex"
    assert body["llm_api_key_configured"] is False


def test_outsider_api_patch_own_org(outsider_api_client, demo, other_demo):
    set_llm_api_key(demo.organization, FIRST_KEY)

    outsider_api_client.patch(SETTINGS_URL, {"clear_llm_api_key": True}, format="json")
    outsider_api_client.patch(SETTINGS_URL, {"llm_api_key": SECOND_KEY}, format="json")

    assert stored_key(demo.organization) == FIRST_KEY
    assert stored_key(other_demo.organization) == SECOND_KEY


@sensitive_variables()
def patch_with_planted_key(client):
    """Send a new key that appears in no source line and no visible local."""
    import uuid

    planted = "sk-" + uuid.uuid4().hex + uuid.uuid4().hex
    response = client.patch(
        "/api/organization/settings",
        {"llm_api_key": planted},
        content_type="application/json",
    )
    return response, planted


def test_debug_error_page_hides_new_key(client, owner, openai_server, settings, monkeypatch):
    from orgs.views import OrganizationSettingsView

    settings.DEBUG = True
    client.raise_request_exception = False
    client.force_login(owner)

    def fail(self, organization, data):
        raise RuntimeError("simulated failure after validation")

    monkeypatch.setattr(OrganizationSettingsView, "apply_fields", fail)
    response, planted = patch_with_planted_key(client)

    assert response.status_code == 500
    assert b"simulated failure" in response.content
    assert planted.encode() not in response.content
    assert planted[-12:].encode() not in response.content


def test_failed_patch_changes_nothing(api_client, demo, openai_server):
    from keyvault.models import Secret

    response = api_client.patch(
        "/api/organization/settings",
        {"llm_api_key": "sk-atomic-check-key-000000000000000000ATM1", "llm_key_query_cap": 2**40},
        format="json",
    )

    assert response.status_code == 422
    assert Secret.objects.count() == 0


@pytest.mark.parametrize(
    "body",
    [
        '{"query": "q", "principal_id": "a", "connector_id": "c", "search_mode": "\\ud800"}',
        "[" * 5000 + "]" * 5000,
        '{"a": ' * 100 + "1" + "}" * 100,
        '{"query": NaN}',
    ],
)
def test_hostile_json_is_422(api_client, demo, body):
    response = api_client.post(
        "/api/answers/execute", body, content_type="application/json"
    )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


@pytest.mark.parametrize(
    "name", ["GATECO_LOCAL_KEK", "OPENAI_API_KEY", "SECRET_KEY", "GATECO_LOCAL_KEK_PREVIOUS"]
)
def test_error_report_masks_secret_settings(settings, name):
    from gateco.reporting import AlwaysSafeExceptionReporterFilter

    settings.DEBUG = True
    settings.OPENAI_API_KEY = "sk-settings-canary-0000000000000000000SET1"
    settings.GATECO_LOCAL_KEK_PREVIOUS = ["b2xkLWtlay1jYW5hcnk="]

    safe = AlwaysSafeExceptionReporterFilter().get_safe_settings()

    assert safe[name] == AlwaysSafeExceptionReporterFilter.cleansed_substitute
