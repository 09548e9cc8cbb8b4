"""The one place that decides which organization a request acts for.

Every view that touches organization-owned rows goes through these helpers, so
tenant isolation is reviewed here rather than in each view.
"""

from django.http import Http404
from rest_framework import exceptions

from .authentication import ApiKeyUser
from .models import Membership


def organization_for_request(request):
    """Return the organization an API key or a signed-in member acts for."""
    user = request.user
    if isinstance(user, ApiKeyUser):
        return user.api_key.organization

    membership = membership_for_user(user)
    if membership is None:
        raise exceptions.PermissionDenied("You are not a member of any organization.")
    return membership.organization


def membership_for_user(user):
    """Return the user's membership, or None for outsiders and anonymous users.

    NOTE: a user belongs to one organization here; choosing among several is
    not built yet, so the oldest membership wins.
    """
    if not user.is_authenticated or isinstance(user, ApiKeyUser):
        return None
    return (
        Membership.objects.select_related("organization")
        .filter(user=user)
        .order_by("created_at")
        .first()
    )


def get_owned_or_404(queryset, organization, *, via="organization", **lookup):
    """Fetch one row of `organization`; outsiders get 404, never 403.

    `via` is the lookup path from the row to its organization, such as
    "connector__organization" for a row that belongs to a connector.
    """
    obj = queryset.filter(**{via: organization}, **lookup).first()
    if obj is None:
        raise Http404
    return obj


def actor_label(request):
    """Describe who made the request, for audit rows: never a secret."""
    user = request.user
    if isinstance(user, ApiKeyUser):
        return f"api_key:{user.api_key.prefix}"
    return f"user:{user.pk}"
