"""The cluster secret: mutual authentication and sealed frames.

With a keyring, every connection starts with a challenge-response that proves both ends hold
one of the swarm's secrets, and from then on every frame travels sealed with AES-256-GCM
under keys derived for that connection alone::

    client                                           server
    HELLO {versions, kid, nonce_c, dh_c}  ------>    key with that id? (else: refused)
                                          <------    AUTH {nonce_s, dh_s, proof_s}
    proof_s ok? (else: not our swarm)
    AUTH {proof_c}                        ------>    proof_c ok? (else: refused)
    ... every frame from here on: SEALED {} [AES-GCM record], both ways ...

``kid`` names the key (an HMAC of it, not the key). ``dh_c`` and ``dh_s`` are ephemeral
X25519 public keys, new for every connection. With ``t = nonce_c | nonce_s | dh_c | dh_s``,
``proof_s = HMAC(k, "server" | t)`` and ``proof_c = HMAC(k, "client" | t)``, compared in
constant time: each side proves it holds the secret, bound to this connection's nonces and
keys. Both nonces are fresh 32-byte random values, so no message of an earlier connection is
of any use in a later one. The two directions get separate keys, HKDF-SHA256 over the secret
and the X25519 shared value with ``t`` as salt, so recorded traffic stays sealed even if the
secret leaks later (forward secrecy), and each record's GCM nonce is its position in the
stream: a record replayed, dropped, reordered or changed fails authentication, and the
connection closes without anything of it being parsed. An unauthenticated caller learns one
thing only: "authentication failed".

A keyring file holds one secret per line (at least 16 bytes each; ``#`` comments and blank
lines are ignored). The first secret is the one this peer proves it holds when it calls; all
of them are accepted from callers. Rotating a live swarm: add the new secret as a second line
on every peer (restart them one by one), then move it to the first line everywhere, then
remove the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .framing import KIND_OF, Decoder, Frame, FrameError, Limits, MsgType, encode, text
from .transport import Connection, TransportError

MIN_SECRET = 16  # bytes
NONCE_BYTES = 32
# Plaintext bytes per sealed record: a large frame (a model's weights) goes as several.
RECORD = 1 << 20
TAG = 16
AUTH_FAILED = "authentication failed"


class KeyringError(ValueError):
    """A secret file that cannot be used (missing, empty, too short, malformed)."""


class AuthError(TransportError):
    """The other end does not hold a secret of our keyring (or is not who it claims)."""


def new_secret() -> str:
    """A fresh random secret, as one line for a keyring file (64 hex digits: 32 bytes)."""
    return secrets.token_hex(32)


def key_id(key: bytes) -> str:
    return hmac.new(key, b"gossip-train key id", hashlib.sha256).hexdigest()[:16]


def member_tag(key: bytes, name: str) -> str:
    """Who opens a connection, for whoever holds the key (the chaos proxy routes by it); to
    anyone else a meaningless string, where a name in the clear would say who talks."""
    return hmac.new(key, b"gossip-train member " + name.encode(), hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class Keyring:
    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyringError("a keyring needs at least one secret")
        for key in self.keys:
            if len(key) < MIN_SECRET:
                raise KeyringError(f"a secret must be at least {MIN_SECRET} bytes")

    @property
    def primary(self) -> bytes:
        return self.keys[0]

    def find(self, kid: str) -> bytes | None:
        for key in self.keys:
            if _same(kid, key_id(key)):
                return key
        return None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise KeyringError(f"secret file {p}: no such file") from None
        except OSError as exc:
            raise KeyringError(f"secret file {p}: cannot read ({exc.strerror or exc})") from None
        keys = []
        for n, line in enumerate(raw.splitlines(), 1):
            text = line.strip()
            if not text or text.startswith(b"#"):
                continue
            if len(text) < MIN_SECRET:
                raise KeyringError(
                    f"secret file {p}, line {n}: a secret must be at least {MIN_SECRET} bytes "
                    f"(this one has {len(text)}); `gossip-train secret` makes one"
                )
            keys.append(bytes(text))
        if not keys:
            raise KeyringError(f"secret file {p}: no secret in it; `gossip-train secret` makes one")
        return cls(tuple(keys))


def write_secret(path: str | os.PathLike[str], secret: str | None = None) -> Path:
    """A new keyring file readable by its owner only (0600), atomically."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write((secret or new_secret()) + "\n")
    os.replace(tmp, p)
    return p


# -- the handshake ------------------------------------------------------------------------------
DH_BYTES = 32


def _mac(key: bytes, role: bytes, transcript: bytes) -> str:
    return hmac.new(key, role + transcript, hashlib.sha256).hexdigest()


def _same(theirs: Any, ours: str) -> bool:
    """A value from the wire equals our hex digest, compared in constant time. A string
    with non-ASCII characters equals no digest (``compare_digest`` raises TypeError on it)."""
    return isinstance(theirs, str) and theirs.isascii() and hmac.compare_digest(theirs, ours)


def _hex(value: Any, nbytes: int) -> bytes:
    """A hex string of exactly ``nbytes`` bytes from the wire, or AuthError."""
    if not isinstance(value, str) or len(value) != 2 * nbytes:
        raise AuthError(AUTH_FAILED)
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise AuthError(AUTH_FAILED) from None
    if len(raw) != nbytes:  # fromhex skips whitespace: "  " and 62 digits are 31 bytes
        raise AuthError(AUTH_FAILED)
    return raw


def _public(private: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _shared(private: X25519PrivateKey, theirs: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(theirs))
    except ValueError:  # a low-order point: no shared secret worth the name
        raise AuthError(AUTH_FAILED) from None


def _ciphers(key: bytes, shared: bytes, transcript: bytes, we_call: bool) -> tuple[AESGCM, AESGCM]:
    """(send, receive) ciphers of one connection end."""

    def derive(direction: bytes) -> AESGCM:
        hkdf = HKDF(hashes.SHA256(), 32, salt=transcript, info=b"gossip-train " + direction)
        return AESGCM(hkdf.derive(key + shared))

    c2s, s2c = derive(b"client to server"), derive(b"server to client")
    return (c2s, s2c) if we_call else (s2c, c2s)


@dataclass
class ClientState:
    nonce: bytes
    private: X25519PrivateKey


def client_hello(keyring: Keyring, name: str = "") -> tuple[dict[str, Any], ClientState]:
    """The caller's opening: which key, a fresh nonce, an ephemeral public key, and its
    ``member_tag``."""
    state = ClientState(os.urandom(NONCE_BYTES), X25519PrivateKey.generate())
    opening = {
        "kid": key_id(keyring.primary),
        "nonce": state.nonce.hex(),
        "dh": _public(state.private).hex(),
        "tag": member_tag(keyring.primary, name),
    }
    return opening, state


def server_challenge(keyring: Keyring, hello: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The answer to a caller's opening, and what ``server_verify`` needs. AuthError when
    the caller names no key of ours (or sends no well-formed opening)."""
    kid = hello.get("kid")
    key = keyring.find(kid) if isinstance(kid, str) else None
    nonce_c = _hex(hello.get("nonce"), NONCE_BYTES)
    dh_c = _hex(hello.get("dh"), DH_BYTES)
    if key is None:
        raise AuthError(AUTH_FAILED)
    nonce_s, private = os.urandom(NONCE_BYTES), X25519PrivateKey.generate()
    dh_s = _public(private)
    transcript = nonce_c + nonce_s + dh_c + dh_s
    shared = _shared(private, dh_c)
    reply = {"nonce": nonce_s.hex(), "dh": dh_s.hex(), "proof": _mac(key, b"server", transcript)}
    return reply, (key, transcript, shared)


def client_verify(
    keyring: Keyring, state: ClientState, challenge: dict[str, Any]
) -> tuple[dict[str, Any], tuple[AESGCM, AESGCM]]:
    """Check the server's proof; our proof and the (send, receive) ciphers."""
    key = keyring.primary
    nonce_s = _hex(challenge.get("nonce"), NONCE_BYTES)
    dh_s = _hex(challenge.get("dh"), DH_BYTES)
    transcript = state.nonce + nonce_s + _public(state.private) + dh_s
    if not _same(challenge.get("proof"), _mac(key, b"server", transcript)):
        raise AuthError(f"{AUTH_FAILED}: the peer does not hold our secret")
    shared = _shared(state.private, dh_s)
    return {"proof": _mac(key, b"client", transcript)}, _ciphers(key, shared, transcript, True)


def server_verify(state: Any, answer: dict[str, Any]) -> tuple[AESGCM, AESGCM]:
    """Check the caller's proof; the (send, receive) ciphers."""
    key, transcript, shared = state
    if not _same(answer.get("proof"), _mac(key, b"client", transcript)):
        raise AuthError(AUTH_FAILED)
    return _ciphers(key, shared, transcript, False)


# -- sealed frames ------------------------------------------------------------------------------
_COUNTER = struct.Struct("!4xQ")  # a 12-byte GCM nonce: the record's number


class SealedConnection(Connection):
    """A connection whose every frame is sealed (AES-256-GCM records) with per-connection,
    per-direction keys. A record that fails authentication closes the connection at once;
    nothing in it is parsed.

    Bytes are counted as they go on the wire: the connection under this one counts records
    as ``Kind.SEALED``, and this one counts each record (its framing included) again under
    the kind of the frame it carries, in the same ``Stats``. A record never holds parts of
    two frames, so the kind is that of the frame being read once the record is fed.
    """

    def __init__(
        self, inner: Connection, send: AESGCM, recv: AESGCM, limits: Limits | None = None
    ) -> None:
        self.inner = inner
        self.peer = inner.peer
        self._send_aead, self._recv_aead = send, recv
        self._sent = 0
        self._received = 0
        self._decoder = Decoder(limits or Limits())
        self._ready: deque[Frame] = deque()

    @property
    def bytes_sent(self) -> int:  # type: ignore[override]
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:  # type: ignore[override]
        return self.inner.bytes_received

    def _seal(self, data: bytes | bytearray | memoryview) -> bytes:
        nonce = _COUNTER.pack(self._sent)
        self._sent += 1
        return self._send_aead.encrypt(nonce, data, None)

    async def send(
        self, msg_type: int, header: dict[str, Any] | None = None, segments: Sequence[Any] = ()
    ) -> None:
        """One frame as records of at most ``RECORD`` bytes: small pieces (the prefix and
        header) are sealed together, large payloads are sealed slice by slice, uncopied."""
        records: list[bytes] = []
        small = bytearray()
        for piece in encode(msg_type, header, segments):
            view = memoryview(piece).cast("B")
            if view.nbytes < RECORD // 16 and len(small) + view.nbytes <= RECORD:
                small += view
                continue
            if small:
                records.append(self._seal(small))
                small = bytearray()
            for start in range(0, view.nbytes, RECORD):
                records.append(self._seal(view[start : start + RECORD]))
        if small:
            records.append(self._seal(small))
        counts = self.inner.stats.sent_by_kind if self.inner.stats is not None else None
        kind = KIND_OF[msg_type]
        for record in records:
            before = self.inner.bytes_sent
            await self.inner.send(MsgType.SEALED, {}, [record])
            if counts is not None:
                counts[kind] += self.inner.bytes_sent - before

    async def recv(self) -> Frame:
        while not self._ready:
            frame = await self.inner.recv()
            try:
                if frame.type == MsgType.ERROR and not self._received:
                    # The server refused our proof (in the clear: we are not authenticated).
                    raise AuthError(text(frame.header.get("reason", AUTH_FAILED), 200))
                if frame.type != MsgType.SEALED or len(frame.payload) < TAG:
                    raise AuthError("a frame that is not sealed on a sealed connection")
                nonce = _COUNTER.pack(self._received)
                self._received += 1
                try:
                    plain = self._recv_aead.decrypt(nonce, frame.payload, None)
                except InvalidTag:
                    raise AuthError("a frame failed authentication") from None
            except AuthError:
                self.close()
                raise
            finally:
                frame.release()
            try:
                self._ready.extend(self._decoder.feed(plain))
            except FrameError as exc:
                self.close()
                raise TransportError(f"bad sealed frame: {exc}") from None
            if self.inner.stats is not None:
                self.inner.stats.received_by_kind[self._decoder.kind] += frame.size
        return self._ready.popleft()

    def close(self) -> None:
        self.inner.close()

    @property
    def closed(self) -> bool:
        return self.inner.closed
