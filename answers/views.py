from rest_framework.response import Response
from rest_framework.views import APIView

from gateco.errors import ApiError
from orgs.access import actor_label, organization_for_request
from retrieval.lookups import find_connector, find_principal

from . import idempotency
from .serializers import AnswerRequestSerializer
from .services import AnswerRequest, execute_answer


class ExecuteAnswerView(APIView):
    """Answer a principal's question from the chunks that principal may read.

    POST `query`, `principal_id`, `connector_id`, and optionally `top_k`
    (1 to 50, default 5), `search_mode` (`keyword`, `vector` or `hybrid`) and
    `alpha` (hybrid weight, 0 to 1). An `Idempotency-Key` header makes retries
    safe: the same key returns the first result.
    """

    serializer_class = AnswerRequestSerializer

    def post(self, request):
        organization = organization_for_request(request)
        serializer = AnswerRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data

        def compute():
            try:
                answer_request = AnswerRequest(
                    organization=organization,
                    principal=find_principal(organization, data["principal_id"]),
                    connector=find_connector(organization, data["connector_id"]),
                    query=data["query"],
                    top_k=data["top_k"],
                    search_mode=data["search_mode"],
                    alpha=data.get("alpha"),
                    actor=actor_label(request),
                )
                return 200, execute_answer(answer_request), {}
            except ApiError as error:
                return error.status_code, error.body(), error.headers

        status, body, headers = idempotency.run_once(
            organization, request.headers.get(idempotency.HEADER), data, compute
        )
        return Response(body, status=status, headers=headers)
