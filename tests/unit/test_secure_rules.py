"""The handshake's pure functions on hostile openings and answers: whatever the wire holds,
a caller without the secret gets AuthError ("authentication failed"), never another error."""

from __future__ import annotations

from typing import Any

import pytest

from p2p.secure import (
    AuthError,
    Keyring,
    client_hello,
    client_verify,
    server_challenge,
    server_verify,
)

RING = Keyring((b"unit-test-secret-0123456789",))


def _handshake() -> tuple[dict[str, Any], Any, dict[str, Any], Any]:
    hello, client = client_hello(RING, "caller")
    challenge, server = server_challenge(RING, hello)
    return hello, client, challenge, server


@pytest.mark.parametrize("kid", ["\u00e9" * 16, "caef28e3fc0df6d\u00e9", "\u0660" * 16])
def test_a_non_ascii_key_id_is_refused_not_a_type_error(kid: str) -> None:
    # hmac.compare_digest raises TypeError on non-ASCII strings: it escaped Node._serve.
    hello, _ = client_hello(RING)
    with pytest.raises(AuthError, match="authentication failed"):
        server_challenge(RING, {**hello, "kid": kid})
    assert RING.find(kid) is None


def test_a_non_ascii_proof_is_refused_by_either_side() -> None:
    _, client, challenge, server = _handshake()
    bad = "\u00e9" * 64
    with pytest.raises(AuthError, match="authentication failed"):
        server_verify(server, {"proof": bad})
    with pytest.raises(AuthError, match="does not hold our secret"):
        client_verify(RING, client, {**challenge, "proof": bad})


def test_the_handshake_still_completes() -> None:
    _, client, challenge, server = _handshake()
    answer, (c_send, c_recv) = client_verify(RING, client, challenge)
    s_send, s_recv = server_verify(server, answer)
    nonce = bytes(12)
    assert s_recv.decrypt(nonce, c_send.encrypt(nonce, b"x", None), None) == b"x"
    assert c_recv.decrypt(nonce, s_send.encrypt(nonce, b"y", None), None) == b"y"


@pytest.mark.parametrize("field", ["nonce", "dh"])
def test_a_nonce_or_key_with_whitespace_is_not_a_shorter_one(field: str) -> None:
    # bytes.fromhex skips whitespace: 64 characters, two of them spaces, were 31 bytes, and
    # a 31-byte nonce was challenged (the transcript both proofs cover then shifts).
    hello, _ = client_hello(RING)
    for bad in ("  " + hello[field][2:], hello[field][:30] + "  " + hello[field][32:]):
        with pytest.raises(AuthError, match="authentication failed"):
            server_challenge(RING, {**hello, field: bad})
    _, client, challenge, _ = _handshake()
    with pytest.raises(AuthError, match="authentication failed"):
        client_verify(RING, client, {**challenge, field: "  " + challenge[field][2:]})
