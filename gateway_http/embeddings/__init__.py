"""``POST /v1/embeddings``: ``protocol`` (the request and the response object) and
``routes`` (the handler and the Embed call)."""
