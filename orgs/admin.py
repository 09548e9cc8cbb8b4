from django import forms
from django.contrib import admin

from keyvault.vault import llm_api_key_status

from .models import ApiKey, CreditLedgerEntry, FallbackCallGrant, Membership, Organization


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


class GrantForm(forms.ModelForm):
    amount = forms.IntegerField(min_value=1, max_value=100_000)
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}))

    class Meta:
        model = FallbackCallGrant
        fields = ["amount", "reason"]


class GrantInline(admin.TabularInline):
    """Grants of extra fallback calls: support staff add them with a reason."""

    model = FallbackCallGrant
    form = GrantForm
    fk_name = "organization"
    fields = ["amount", "reason", "actor", "created_at"]
    readonly_fields = ["actor", "created_at"]
    extra = 0
    can_delete = False

    def get_queryset(self, request):
        return super().get_queryset(request).filter(kind=CreditLedgerEntry.Kind.GRANT)

    def has_change_permission(self, request, obj=None):
        return False


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
    readonly_fields = [
        "id",
        "fallback_calls_used",
        "fallback_calls_granted",
        "llm_key_status",
        "llm_key_uses",
        "created_at",
    ]
    fields = [
        "id",
        "name",
        "slug",
        "tier",
        "fallback_calls_used",
        "fallback_calls_granted",
        "llm_key_status",
        "llm_key_query_cap",
        "llm_key_uses",
        "created_at",
    ]
    inlines = [MembershipInline, GrantInline]

    def save_formset(self, request, form, formset, change):
        if formset.model is not FallbackCallGrant:
            return super().save_formset(request, form, formset, change)
        # Grants go through the model method, which raises the limit and writes
        # the ledger entry in one transaction.
        formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
        for grant_form in formset.forms:
            if grant_form.instance.pk or not grant_form.has_changed():
                continue
            entry = form.instance.grant_fallback_calls(
                grant_form.cleaned_data["amount"],
                grant_form.cleaned_data["reason"],
                granted_by=request.user,
            )
            formset.new_objects.append(entry)

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
