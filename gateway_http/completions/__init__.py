"""``POST /v1/completions``, the legacy text completions: ``protocol`` (the request),
``responses`` (the ``text_completion`` shape) and ``routes``. The generation itself is
the chat pipeline's (``gateway_http/chat/routes.py::serve``)."""
