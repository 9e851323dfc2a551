"""What a tenant id may be, in one place: every component that stores one checks it the
same way, so a tenant accepted by one (say, a key issued for it) is never refused by
another (its settings, its vault)."""

from __future__ import annotations

from typing import Final

from federation.errors import ErrorCode, FederationError

MAX_TENANT_ID: Final = 200


def checked_tenant_id(tenant_id: str) -> str:
    """``tenant_id`` when it is printable text of 1 to :data:`MAX_TENANT_ID` characters
    without surrounding spaces; INVALID_ARGUMENT naming ``tenant_id`` otherwise."""
    if (not tenant_id or len(tenant_id) > MAX_TENANT_ID or not tenant_id.isprintable()
            or tenant_id != tenant_id.strip()):
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "tenant_id must be printable text "
                              f"of 1 to {MAX_TENANT_ID} characters, without surrounding "
                              "spaces", param="tenant_id")
    return tenant_id
