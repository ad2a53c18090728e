"""NATS decentralised auth (operator mode) made offline, for the `--nats-creds` tests: nkeys
and JWTs built by hand with `cryptography`'s Ed25519, as `nsc` would write them.

    op = Identity.new("operator"); acct = Identity.new("account"); user = Identity.new("user")
    config = operator_config(op, acct)           # nats-server config: MEMORY resolver
    creds = user_creds(acct, user, pub=[...], sub=[...])   # the text of a .creds file

The formats (nats-io/nkeys and nats-io/jwt v2): an nkey is base32 (no padding) of a prefix
byte, the 32-byte key and a CRC-16/XMODEM (little-endian); a seed carries the seed prefix
and the key type in its first two bytes. A JWT is `header.claims.signature`, base64url
without padding, header `{"typ": "JWT", "alg": "ed25519-nkey"}`, signed by the issuer's
seed; `jti` is base32 of SHA-512/256 of the claims without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PREFIX = {"operator": 14 << 3, "account": 0, "user": 20 << 3}
SEED_PREFIX = 18 << 3


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=")


def _with_crc(raw: bytes) -> bytes:
    return raw + binascii.crc_hqx(raw, 0).to_bytes(2, "little")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass
class Identity:
    kind: str
    key: Ed25519PrivateKey

    @staticmethod
    def new(kind: str) -> Identity:
        return Identity(kind, Ed25519PrivateKey.generate())

    @property
    def public(self) -> str:
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return _b32(_with_crc(bytes([PREFIX[self.kind]]) + raw))

    @property
    def seed(self) -> str:
        raw = self.key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        prefix = PREFIX[self.kind]
        head = bytes([SEED_PREFIX | (prefix >> 5), (prefix & 31) << 3])
        return _b32(_with_crc(head + raw))


def jwt(issuer: Identity, subject: Identity, name: str, nats: dict) -> str:
    claims = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject.public,
        "nats": {**nats, "version": 2},
    }
    claims["jti"] = _b32(hashlib.new("sha512_256", json.dumps(claims).encode()).digest())
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64url(json.dumps(claims).encode())
    signature = issuer.key.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64url(signature)}"


def operator_config(operator: Identity, *accounts: Identity) -> str:
    """nats-server configuration in operator mode, the accounts preloaded (MEMORY resolver)."""
    op = jwt(operator, operator, "test-operator", {"type": "operator"})
    limits = {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
    }
    preload = "\n".join(
        f'  {a.public}: "{jwt(operator, a, f"account-{i}", {"type": "account", "limits": limits})}"'
        for i, a in enumerate(accounts)
    )
    return f'operator: "{op}"\nresolver: MEMORY\nresolver_preload: {{\n{preload}\n}}\n'


def user_creds(account: Identity, user: Identity, pub: list[str], sub: list[str]) -> str:
    """A .creds file: the user's JWT (issued by `account`, allowed to publish on `pub` and
    subscribe to `sub`) and its seed."""
    token = jwt(
        account,
        user,
        "user",
        {
            "type": "user",
            "pub": {"allow": pub},
            "sub": {"allow": sub},
            "subs": -1,
            "data": -1,
            "payload": -1,
        },
    )
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{token}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )
