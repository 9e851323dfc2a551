"""API keys: format, strength model, authority (issue/verify/revoke/rotate), quotas, decay."""
