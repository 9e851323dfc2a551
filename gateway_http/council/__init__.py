"""The council over HTTP: ``protocol`` (the API's shapes, no aiohttp), ``routes``
(the handlers and the CouncilService call) and ``openapi`` (its OpenAPI part)."""
