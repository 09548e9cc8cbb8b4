from django.apps import AppConfig


class KeyvaultConfig(AppConfig):
    name = "keyvault"
    verbose_name = "Key vault"

    def ready(self):
        from . import signals  # noqa: F401
