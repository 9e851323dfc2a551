"""The tenant vault: secrets sealed under 2-of-3 split keys (client, gateway, guardian)."""

from federation.vault.records import IssuedShare, SecretInfo, SecretPage
from federation.vault.service import VaultService

__all__ = ["IssuedShare", "SecretInfo", "SecretPage", "VaultService"]
