from rest_framework.response import Response
from rest_framework.views import APIView

from orgs.access import actor_label, organization_for_request
from retrieval.lookups import find_connector, find_principal

from .serializers import AnswerRequestSerializer
from .services import AnswerRequest, execute_answer


class ExecuteAnswerView(APIView):
    """Answer a principal's question from the chunks that principal may read.

    POST `query`, `principal_id`, `connector_id`, and optionally `top_k`
    (1 to 50, default 5) and `search_mode` (`keyword`).
    """

    serializer_class = AnswerRequestSerializer

    def post(self, request):
        organization = organization_for_request(request)
        serializer = AnswerRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data

        answer_request = AnswerRequest(
            organization=organization,
            principal=find_principal(organization, data["principal_id"]),
            connector=find_connector(organization, data["connector_id"]),
            query=data["query"],
            top_k=data["top_k"],
            search_mode=data["search_mode"],
            actor=actor_label(request),
        )
        return Response(execute_answer(answer_request))
