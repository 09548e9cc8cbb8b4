from rest_framework import serializers

from gateco.errors import ValidationFailed
from retrieval.search import validate_search_mode


class AnswerRequestSerializer(serializers.Serializer):
    query = serializers.CharField(max_length=2000, trim_whitespace=True)
    principal_id = serializers.CharField(max_length=200)
    connector_id = serializers.CharField(max_length=200)
    top_k = serializers.IntegerField(min_value=1, max_value=50, default=5)
    search_mode = serializers.CharField(max_length=20, default="keyword")
    filters = serializers.DictField(required=False)
    alpha = serializers.FloatField(required=False, min_value=0.0, max_value=1.0)

    def validate_search_mode(self, value):
        try:
            validate_search_mode(value)
        except ValidationFailed as error:
            raise serializers.ValidationError(error.message) from None
        return value

    def validate_filters(self, value):
        # NOTE: metadata filters are not applied yet, so a non-empty filter is
        # rejected rather than silently ignored.
        if value:
            raise serializers.ValidationError("filters are not supported yet.")
        return value
