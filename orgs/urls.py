from django.urls import path

from . import views

app_name = "orgs"

urlpatterns = [
    path("settings/api-keys/", views.api_keys_page, name="api-keys"),
]
