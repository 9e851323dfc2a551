"""Property tests of envelope encryption: opening, forged shares, bindings, wrapping."""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.crypto.envelope import (
    CiphertextInvalid,
    SealedObject,
    UnwrapError,
    key_check_value,
    new_data_key,
    open_sealed,
    open_with_shares,
    seal,
    unwrap,
    wrap,
    wrap_context,
)
from federation.crypto.keyfile import KeyFileError, load_or_create_key
from federation.crypto.shares import InvalidShare, Share, combine_shares, new_key_id, split_key

FAST = settings(max_examples=20, deadline=None)
texts = st.text(min_size=1, max_size=12)
plaintexts = st.binary(max_size=256)


def sealed_with_shares(
    plaintext: bytes, tenant: str = "t1", obj: str = "o1", version: int = 1
) -> tuple[SealedObject, tuple[Share, Share, Share]]:
    key, key_id = new_data_key(), new_key_id()
    sealed = seal(key, plaintext, tenant_id=tenant, object_id=obj, version=version, key_id=key_id)
    return sealed, split_key(key, key_id)


@FAST
@given(plaintext=plaintexts, tenant=texts, obj=texts, version=st.integers(1, 2**40))
def test_any_two_shares_open_the_object(
    plaintext: bytes, tenant: str, obj: str, version: int
) -> None:
    sealed, shares = sealed_with_shares(plaintext, tenant, obj, version)
    for a, b in itertools.permutations(shares, 2):
        assert open_with_shares(a, b, sealed) == plaintext


@FAST
@given(plaintext=plaintexts, forged=st.binary(min_size=32, max_size=32), data=st.data())
def test_one_share_plus_a_forged_share_is_an_invalid_share(
    plaintext: bytes, forged: bytes, data: st.DataObject
) -> None:
    sealed, shares = sealed_with_shares(plaintext)
    good = data.draw(st.sampled_from(shares))
    index = data.draw(st.sampled_from([i for i in (1, 2, 3) if i != good.index]))
    fake = Share(good.version, good.key_id, index, forged)
    with pytest.raises(InvalidShare, match=r"^invalid share"):
        open_with_shares(good, fake, sealed)


@FAST
@given(plaintext=plaintexts, data=st.data())
def test_one_share_plus_a_foreign_share_is_an_invalid_share(
    plaintext: bytes, data: st.DataObject
) -> None:
    sealed, shares = sealed_with_shares(plaintext)
    _, foreign = sealed_with_shares(plaintext)
    good = data.draw(st.sampled_from(shares))
    other = data.draw(st.sampled_from([s for s in foreign if s.index != good.index]))
    with pytest.raises(InvalidShare, match=r"^invalid share"):
        open_with_shares(good, other, sealed)
    # Even relabelled with the right key id, the foreign share's values do not fit.
    relabelled = replace(other, key_id=good.key_id)
    with pytest.raises(InvalidShare, match=r"^invalid share"):
        open_with_shares(good, relabelled, sealed)


@FAST
@given(plaintext=plaintexts, bit=st.integers(0, 255), data=st.data())
def test_a_corrupted_share_is_an_invalid_share_not_garbage(
    plaintext: bytes, bit: int, data: st.DataObject
) -> None:
    sealed, shares = sealed_with_shares(plaintext)
    a, b = data.draw(st.permutations(shares))[:2]
    flipped = bytearray(b.payload)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InvalidShare, match=r"^invalid share"):
        open_with_shares(a, replace(b, payload=bytes(flipped)), sealed)


@FAST
@given(plaintext=plaintexts, tenant=texts, other_tenant=texts, obj=texts, other_obj=texts)
def test_ciphertexts_do_not_move_across_tenants_objects_or_versions(
    plaintext: bytes, tenant: str, other_tenant: str, obj: str, other_obj: str
) -> None:
    sealed, shares = sealed_with_shares(plaintext, tenant, obj, 1)
    moves = []
    if other_tenant != tenant:
        moves.append(replace(sealed, tenant_id=other_tenant))
    if other_obj != obj:
        moves.append(replace(sealed, object_id=other_obj))
    moves.append(replace(sealed, version=2))
    for moved in moves:
        with pytest.raises(CiphertextInvalid):
            open_with_shares(shares[0], shares[1], moved)


def test_swapping_ciphertexts_between_two_objects_fails() -> None:
    """Attacker swaps the stored ciphertexts of two tenants' objects but not their keys."""
    a, a_shares = sealed_with_shares(b"alpha", "tenant-a", "obj")
    b, _ = sealed_with_shares(b"bravo", "tenant-b", "obj")
    swapped = replace(b, tenant_id=a.tenant_id, key_id=a.key_id, kcv=a.kcv)
    with pytest.raises(CiphertextInvalid):
        open_with_shares(a_shares[0], a_shares[2], swapped)


def test_tampered_ciphertext_is_not_reported_as_a_bad_share() -> None:
    sealed, shares = sealed_with_shares(b"x" * 40)
    body = bytearray(sealed.ciphertext)
    body[3] ^= 0x01
    with pytest.raises(CiphertextInvalid):
        open_with_shares(shares[0], shares[1], replace(sealed, ciphertext=bytes(body)))
    with pytest.raises(CiphertextInvalid):
        open_sealed(
            combine_shares(shares[0], shares[1]), replace(sealed, nonce=os.urandom(12)),
        )


def test_every_version_gets_its_own_key_and_nonce() -> None:
    seen_nonces, seen_kcvs = set(), set()
    for version in range(1, 50):
        key = new_data_key()
        sealed = seal(
            key, b"same", tenant_id="t", object_id="o", version=version, key_id=new_key_id()
        )
        seen_nonces.add(sealed.nonce)
        seen_kcvs.add(sealed.kcv)
        assert len(sealed.nonce) == 12 and sealed.kcv == key_check_value(key)
    assert len(seen_nonces) == len(seen_kcvs) == 49


def test_sealed_repr_holds_no_material() -> None:
    sealed, _ = sealed_with_shares(b"secret")
    assert sealed.ciphertext.hex() not in repr(sealed) and sealed.kcv.hex() not in repr(sealed)


@FAST
@given(value=st.binary(max_size=64), ctx=texts, other=texts)
def test_wrap_binds_key_and_context(value: bytes, ctx: str, other: str) -> None:
    key, wrong = new_data_key(), new_data_key()
    wrapped = wrap(key, value, wrap_context("share", ctx))
    assert len(value) < 8 or value not in wrapped  # (short values can occur by chance)
    assert unwrap(key, wrapped, wrap_context("share", ctx)) == value
    with pytest.raises(UnwrapError):
        unwrap(wrong, wrapped, wrap_context("share", ctx))
    if other != ctx:
        with pytest.raises(UnwrapError):
            unwrap(key, wrapped, wrap_context("share", other))
    with pytest.raises(UnwrapError):
        unwrap(key, wrapped[:10], wrap_context("share", ctx))


def test_wrap_context_is_unambiguous() -> None:
    assert wrap_context("ab", "c") != wrap_context("a", "bc")


def test_key_file_is_created_once_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "wrapping.key"
    first = load_or_create_key(path)
    assert len(first) == 32 and (path.stat().st_mode & 0o777) == 0o600
    assert load_or_create_key(path) == first
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by other users"):
        load_or_create_key(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(KeyFileError, match="32-byte"):
        load_or_create_key(path)
