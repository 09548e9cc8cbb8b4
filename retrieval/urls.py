"""Routes of the retrieval API, mounted under /api/ by gateco.urls.

Paths and methods follow the `gateco` SDK (version 1.13.0), without trailing
slashes.
"""

from django.urls import path

from . import views

urlpatterns = [
    path("principals", views.PrincipalListView.as_view(), name="principals"),
    path(
        "principals/resolve",
        views.PrincipalResolveView.as_view(),
        name="principals-resolve",
    ),
    path(
        "principals/<str:principal_id>",
        views.PrincipalDetailView.as_view(),
        name="principal",
    ),
    path("policies", views.PolicyListView.as_view(), name="policies"),
    path("policies/<str:policy_id>", views.PolicyDetailView.as_view(), name="policy"),
    path(
        "policies/<str:policy_id>/activate",
        views.PolicyActivateView.as_view(),
        name="policy-activate",
    ),
    path(
        "policies/<str:policy_id>/archive",
        views.PolicyArchiveView.as_view(),
        name="policy-archive",
    ),
    path("relationships", views.RelationshipListView.as_view(), name="relationships"),
    path(
        "relationships/<str:relationship_id>",
        views.RelationshipDetailView.as_view(),
        name="relationship",
    ),
    path("v1/ingest", views.IngestDocumentView.as_view(), name="ingest"),
    path("v1/ingest/batch", views.IngestBatchView.as_view(), name="ingest-batch"),
    # External ids may contain slashes, such as "reports/q3.md".
    path(
        "v1/ingest/resources/<path:external_resource_id>",
        views.IngestResourceView.as_view(),
        name="ingest-resource",
    ),
    path(
        "retrievals/execute",
        views.ExecuteRetrievalView.as_view(),
        name="retrievals-execute",
    ),
    path("simulator/run", views.SimulatorRunView.as_view(), name="simulator-run"),
]
