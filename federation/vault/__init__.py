"""The tenant vault: secrets sealed under 2-of-3 split keys (client, gateway, guardian)."""

from federation.vault.service import IssuedShare, SecretInfo, SecretPage, VaultService

__all__ = ["IssuedShare", "SecretInfo", "SecretPage", "VaultService"]
