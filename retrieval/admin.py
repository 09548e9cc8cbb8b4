from django.contrib import admin

from .models import (
    AuditEvent,
    Chunk,
    Connector,
    MonthlyUsage,
    Policy,
    Principal,
    Relationship,
    Resource,
    Retrieval,
)


@admin.register(Principal)
class PrincipalAdmin(admin.ModelAdmin):
    list_display = ["external_id", "display_name", "organization", "status"]
    list_filter = ["organization", "status"]
    search_fields = ["external_id", "display_name", "email"]


@admin.register(Connector)
class ConnectorAdmin(admin.ModelAdmin):
    list_display = ["name", "organization", "kind", "index_version", "created_at"]
    readonly_fields = ["index_version"]


class ChunkInline(admin.TabularInline):
    model = Chunk
    extra = 0
    exclude = ["embedding"]


@admin.register(Resource)
class ResourceAdmin(admin.ModelAdmin):
    list_display = [
        "title",
        "external_id",
        "connector",
        "classification",
        "sensitivity",
    ]
    list_filter = ["classification", "sensitivity", "connector"]
    search_fields = ["title", "external_id"]
    inlines = [ChunkInline]


@admin.register(Policy)
class PolicyAdmin(admin.ModelAdmin):
    """Saving runs Policy.clean, which rejects rules the engine cannot evaluate."""

    list_display = ["name", "organization", "type", "effect", "status", "version"]
    list_filter = ["organization", "status", "effect"]
    readonly_fields = ["version", "created_by"]

    def save_model(self, request, obj, form, change):
        if change and form.changed_data:
            obj.version += 1
        super().save_model(request, obj, form, change)


@admin.register(Relationship)
class RelationshipAdmin(admin.ModelAdmin):
    list_display = ["subject", "relation_name", "object", "organization", "created_at"]
    list_filter = ["organization", "relation_name"]
    raw_id_fields = ["subject", "object"]


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records that are written only by the service, never edited by hand."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Retrieval)
class RetrievalAdmin(ReadOnlyAdmin):
    list_display = [
        "created_at",
        "organization",
        "principal",
        "decision",
        "allowed_chunks",
        "denied_chunks",
        "refill_rounds",
    ]
    list_filter = ["organization", "decision", "search_mode"]


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "organization", "event_type", "decision", "actor"]
    list_filter = ["organization", "event_type", "decision"]


@admin.register(MonthlyUsage)
class MonthlyUsageAdmin(ReadOnlyAdmin):
    list_display = ["organization", "month", "retrievals"]
    list_filter = ["organization"]
