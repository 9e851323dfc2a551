"""Property tests of the 2-of-3 split and the ``fedshare_`` text form."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from Crypto.Protocol.SecretSharing import Shamir, _Element
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.crypto.shares import (
    FORMAT_VERSION,
    PREFIX,
    InvalidShare,
    MalformedShare,
    Share,
    combine_shares,
    library_combine,
    new_key_id,
    split_key,
)

keys = st.binary(min_size=32, max_size=32)
key_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
FAST = settings(max_examples=25, deadline=None)


@FAST
@given(key=keys, key_id=key_ids)
def test_any_two_of_three_shares_give_the_key(key: bytes, key_id: str) -> None:
    shares = split_key(key, key_id)
    assert [s.index for s in shares] == [1, 2, 3]
    for a, b in itertools.permutations(shares, 2):
        assert combine_shares(a, b) == key


@FAST
@given(key=keys, key_id=key_ids)
def test_text_form_round_trips(key: bytes, key_id: str) -> None:
    for share in split_key(key, key_id):
        text = share.encode()
        assert text.startswith(PREFIX) and text == text.strip().lower()
        assert Share.decode(text) == share
        assert Share.decode(f"  {text}\n") == share


@FAST
@given(key=keys, data=st.data())
def test_a_mistyped_share_is_rejected_before_any_work(key: bytes, data: st.DataObject) -> None:
    text = split_key(key, new_key_id())[0].encode()
    body = text[len(PREFIX) :]
    position = data.draw(st.integers(0, len(body) - 1), label="position")
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    replacement = data.draw(st.sampled_from(alphabet.replace(body[position], "")))
    typo = PREFIX + body[:position] + replacement + body[position + 1 :]
    with pytest.raises(MalformedShare, match=r"^invalid share"):
        Share.decode(typo)


@pytest.mark.parametrize(
    "text",
    ["", "fedshare_", "share_abc", "fedshare_!!!!", "fedshare_" + "a" * 86,
     "fedshare_" + "a" * 200],
)
def test_garbage_share_text_is_malformed(text: str) -> None:
    with pytest.raises(MalformedShare, match=r"^invalid share"):
        Share.decode(text)


def test_a_dropped_or_swapped_character_is_caught() -> None:
    text = split_key(bytes(range(32)), new_key_id())[1].encode()
    body = text[len(PREFIX) :]
    with pytest.raises(MalformedShare):
        Share.decode(text[:-1])
    for i in range(len(body) - 1):
        if body[i] != body[i + 1]:
            swapped = body[:i] + body[i + 1] + body[i] + body[i + 2 :]
            with pytest.raises(MalformedShare):
                Share.decode(PREFIX + swapped)


def test_shares_of_different_keys_cannot_be_mixed() -> None:
    a = split_key(bytes(32), new_key_id())
    b = split_key(bytes(32), new_key_id())
    with pytest.raises(InvalidShare, match="different keys"):
        combine_shares(a[0], b[1])


def test_duplicate_indexes_are_refused() -> None:
    a = split_key(bytes(32), new_key_id())
    with pytest.raises(InvalidShare, match="index"):
        combine_shares(a[0], a[0])
    with pytest.raises(InvalidShare, match="index"):
        combine_shares(a[1], replace(a[1], payload=bytes(32)))


def test_share_construction_checks_bounds() -> None:
    with pytest.raises(MalformedShare):
        Share(FORMAT_VERSION, new_key_id(), 0, bytes(32))
    with pytest.raises(MalformedShare):
        Share(FORMAT_VERSION, new_key_id(), 4, bytes(32))
    with pytest.raises(MalformedShare):
        Share(2, new_key_id(), 1, bytes(32))
    with pytest.raises(MalformedShare):
        Share(FORMAT_VERSION, new_key_id(), 1, bytes(31))
    with pytest.raises(ValueError):
        split_key(bytes(31), new_key_id())
    with pytest.raises(ValueError):
        split_key(bytes(32), "not-hex")


def test_repr_never_shows_the_payload() -> None:
    share = split_key(b"\xab" * 32, new_key_id())[0]
    assert share.payload.hex() not in repr(share)
    assert "payload" not in repr(share)


# ---- one share alone says nothing about the key ---------------------------------------------


def _line_through(x: int, y: bytes, secret: bytes, at: int) -> bytes:
    """Value at ``at`` of the degree-1 polynomial p with p(0) = secret and p(x) = y, in the
    library's own field GF(2^128): p(X) = secret + ((y - secret) / x)·X."""
    slope = (_Element(y) + _Element(secret)) * _Element(x).inverse()
    return (_Element(secret) + slope * _Element(at)).encode()


@settings(max_examples=10, deadline=None)
@given(key=keys, candidate=keys, known=st.sampled_from([1, 2, 3]))
def test_one_share_is_consistent_with_every_possible_key(
    key: bytes, candidate: bytes, known: int
) -> None:
    """By construction: for ANY candidate key there is a full, valid sharing that contains
    the one share an attacker holds and opens to that candidate. So a single share rules out
    no key at all (the scheme is perfectly hiding)."""
    key_id = new_key_id()
    held = split_key(key, key_id)[known - 1]
    other = next(i for i in (1, 2, 3) if i != known)
    completed = _line_through(known, held.payload[:16], candidate[:16], other) + _line_through(
        known, held.payload[16:], candidate[16:], other
    )
    forged = Share(FORMAT_VERSION, key_id, other, completed)
    assert combine_shares(held, forged) == candidate


def test_one_share_is_uniform_over_a_small_field() -> None:
    """Exhaustively, on GF(2^8) and GF(17): for each fixed x, the share value y = s + a·x
    takes every field value exactly once per secret s as the random coefficient a ranges
    over the field — the distribution of a single share does not depend on the secret."""
    p = 17
    for x in range(1, p):
        for secret in range(p):
            assert sorted((secret + a * x) % p for a in range(p)) == list(range(p))

    def gf256_mul(a: int, b: int) -> int:
        result = 0
        while b:
            if b & 1:
                result ^= a
            a = (a << 1) ^ (0x11B if a & 0x80 else 0)
            b >>= 1
        return result

    for x in (1, 2, 3):
        for secret in range(256):
            assert sorted(secret ^ gf256_mul(a, x) for a in range(256)) == list(range(256))


def test_library_refuses_32_byte_secrets_which_is_why_we_split_halves() -> None:
    with pytest.raises(ValueError, match="16 byte"):
        Shamir.split(2, 3, bytes(32))


@settings(max_examples=30, deadline=None)
@given(key=keys, key_id=key_ids, forged=st.binary(min_size=32, max_size=32))
def test_fast_combine_equals_the_library_combine(key: bytes, key_id: str, forged: bytes) -> None:
    """The linear-map combine gives exactly ``Shamir.combine``'s result for every ordered
    pair — on valid shares and on arbitrary (forged) share values alike."""
    shares = split_key(key, key_id)
    for a, b in itertools.permutations(shares, 2):
        assert combine_shares(a, b) == library_combine(a, b) == key
        fake = replace(b, payload=forged)
        assert combine_shares(a, fake) == library_combine(a, fake)
