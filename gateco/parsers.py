import json

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

# Deeper nesting than any Gateco request needs; Python's json module would
# otherwise recurse until RecursionError on a crafted body.
MAX_JSON_DEPTH = 32


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser, rejecting bodies nested deeper than MAX_JSON_DEPTH."""

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        raw = stream.read() if stream is not None else b""
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            raise ParseError(f"The body is not valid {encoding} text.") from None
        opening_brackets = text.count("[") + text.count("{")
        if opening_brackets > MAX_JSON_DEPTH and nesting_depth(text) > MAX_JSON_DEPTH:
            raise ParseError(f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.")
        try:
            return json.loads(text, parse_constant=reject_constant)
        except ValueError as error:
            raise ParseError(f"JSON parse error - {error}") from None


def nesting_depth(text):
    """Return the deepest nesting of [ and { outside JSON strings."""
    depth = deepest = 0
    in_string = escaped = False
    for character in text:
        if in_string:
            if escaped:
                escaped = False
            elif character == "\\":
                escaped = True
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif character in "]}":
            depth -= 1
    return deepest


def reject_constant(name):
    # NaN and Infinity are not JSON; DRF's own parser rejects them too.
    raise ValueError(f"{name} is not valid JSON")
