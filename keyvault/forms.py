import re

from django import forms
from django.core.exceptions import ValidationError

# The masked form of a stored key, as pages show it. Submitting it back
# means "keep the stored key".
MASKED_KEY = re.compile(r"[•*]{4,}[\x21-\x7e]{0,4}")
# OpenAI keys are printable ASCII without spaces ("sk-...", "sk-proj-...").
KEY_PATTERN = re.compile(r"[\x21-\x7e]{20,400}")


def validate_llm_api_key(value):
    """Raise ValidationError unless `value` looks like an OpenAI API key.

    The message never repeats the value, so a pasted key cannot leak into a
    rendered error.
    """
    if not KEY_PATTERN.fullmatch(value):
        raise ValidationError(
            "This does not look like an OpenAI API key: expected 20 to 400 "
            "printable characters with no spaces, such as sk-...",
            code="invalid_llm_api_key",
        )


class LlmApiKeyForm(forms.Form):
    llm_api_key = forms.CharField(
        label="LLM API Key",
        required=False,
        strip=True,
        widget=forms.PasswordInput(
            render_value=False, attrs={"autocomplete": "off", "spellcheck": "false"}
        ),
    )

    def clean_llm_api_key(self):
        value = self.cleaned_data["llm_api_key"]
        if MASKED_KEY.fullmatch(value):
            return ""
        if value:
            validate_llm_api_key(value)
        return value
