from django.db.models.signals import post_delete
from django.dispatch import receiver

from orgs.models import Organization

from .vault import data_key_cache


@receiver(post_delete, sender=Organization)
def forget_deleted_organization_keys(sender, instance, **kwargs):
    # The DataKey row goes with the organization (CASCADE); this drops the
    # unwrapped copy this process may still hold.
    data_key_cache.forget(instance.pk)
