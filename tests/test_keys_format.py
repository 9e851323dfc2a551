"""The fed_<key id>_<secret> format: round trip, checksum, rejection before lookup."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.errors import ErrorCode, FederationError
from federation.keys import keyformat


def test_generated_keys_parse_back() -> None:
    parts, key = keyformat.generate()
    assert key.startswith("fed_") and len(key) == 4 + 16 + 1 + 43 + 6
    assert keyformat.parse(key) == parts
    assert "secret" not in repr(parts) or "<redacted>" in repr(parts)
    assert parts.secret not in repr(parts)


@given(st.integers(min_value=4, max_value=69), st.sampled_from("0aZ_"))
def test_any_single_character_change_is_rejected(position: int, replacement: str) -> None:
    _, key = keyformat.generate()
    if key[position] == replacement:
        return
    typo = key[:position] + replacement + key[position + 1 :]
    with pytest.raises(FederationError) as refused:
        keyformat.parse(typo)
    assert refused.value.code is ErrorCode.UNAUTHENTICATED


@pytest.mark.parametrize("bad", ["", "fed_", "sk-123", "fed_abc_def", "fed_" + "a" * 80])
def test_malformed_keys_are_rejected(bad: str) -> None:
    with pytest.raises(FederationError, match="malformed"):
        keyformat.parse(bad)


def test_truncated_key_fails_the_checksum_or_shape() -> None:
    _, key = keyformat.generate()
    with pytest.raises(FederationError):
        keyformat.parse(key[:-1])
