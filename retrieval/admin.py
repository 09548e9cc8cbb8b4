from django.contrib import admin

from .models import Chunk, Connector, Policy, Principal, Resource


@admin.register(Principal)
class PrincipalAdmin(admin.ModelAdmin):
    list_display = ["external_id", "display_name", "organization", "status"]
    list_filter = ["organization", "status"]
    search_fields = ["external_id", "display_name", "email"]


@admin.register(Connector)
class ConnectorAdmin(admin.ModelAdmin):
    list_display = ["name", "organization", "kind", "created_at"]


class ChunkInline(admin.TabularInline):
    model = Chunk
    extra = 0


@admin.register(Resource)
class ResourceAdmin(admin.ModelAdmin):
    list_display = ["title", "external_id", "connector", "classification"]
    list_filter = ["classification", "connector"]
    search_fields = ["title", "external_id"]
    inlines = [ChunkInline]


@admin.register(Policy)
class PolicyAdmin(admin.ModelAdmin):
    list_display = ["name", "organization", "type", "effect", "status"]
    list_filter = ["organization", "status", "effect"]
