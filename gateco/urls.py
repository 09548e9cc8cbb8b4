from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

from answers.views import ExecuteAnswerView
from orgs.views import OrganizationSettingsView

api_patterns = [
    path("answers/execute", ExecuteAnswerView.as_view(), name="answers-execute"),
    path(
        "organization/settings",
        OrganizationSettingsView.as_view(),
        name="organization-settings",
    ),
    path("", include("retrieval.urls")),
]

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="orgs:api-keys"), name="home"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/", include(api_patterns)),
    path("api-auth/", include("rest_framework.urls")),
    path("", include("orgs.urls")),
]
