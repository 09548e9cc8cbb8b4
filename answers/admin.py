from django.contrib import admin

from .models import AnswerAudit


@admin.register(AnswerAudit)
class AnswerAuditAdmin(admin.ModelAdmin):
    list_display = ["created_at", "organization", "principal", "key_source", "model", "outcome", "error_code"]
    list_filter = ["key_source", "outcome", "organization"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
