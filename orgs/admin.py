from django.contrib import admin

from keyvault.vault import llm_api_key_status

from .models import ApiKey, Membership, Organization


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "tier",
        "fallback_calls_used",
        "fallback_call_limit",
        "llm_key_status",
        "created_at",
    ]
    list_filter = ["tier"]
    search_fields = ["name", "slug"]
    readonly_fields = ["id", "fallback_calls_used", "llm_key_status", "created_at"]
    fields = ["id", "name", "slug", "tier", "fallback_calls_used", "llm_key_status", "created_at"]
    inlines = [MembershipInline]

    @admin.display(description="LLM API key")
    def llm_key_status(self, organization):
        configured, last_four = llm_api_key_status(organization)
        return f"Set (…{last_four})" if configured else "Not set"

    @admin.display(description="Fallback limit")
    def fallback_call_limit(self, organization):
        return organization.fallback_call_limit


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "organization", "prefix", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["organization"]
    fields = ["organization", "name", "prefix", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = ["organization", "name", "prefix", "created_at", "last_used_at"]

    def has_add_permission(self, request):
        # Keys are issued with `manage.py issue_api_key`, which shows the key once.
        return False
