"""The error that search and embedding raise, in its own module so that
`engines`, `vector_index` and `embeddings` can all import it."""

from gateco.errors import ApiError


class SearchUnavailable(ApiError):
    """A search or embedding that cannot run, with a stable code.

    It is an ApiError, so the API's exception handler renders it with
    `status_code`, `code` and `message`. Codes:

    - EMBEDDING_KEY_MISSING (422): a vector search without `query_vector`,
      and the organization has no LLM API key to embed the query with.
    - KEY_UNAVAILABLE (503): the organization's key could not be decrypted.
    - EMBEDDING_FAILED (502): the embeddings API failed or timed out.
    - INVALID_QUERY_VECTOR (422): `query_vector` is empty, zero or not finite.
    - VECTOR_DIMENSION_MISMATCH (422): `query_vector` has another length than
      the connector's embeddings.
    - KEYWORD_SEARCH_UNSUPPORTED (501): the database has no full-text index.
    """

    def __init__(self, code, message, status_code=422):
        super().__init__(message)
        self.code = code
        self.status_code = status_code
