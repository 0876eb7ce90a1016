"""Signing keys and signatures in cosign's formats.

Known answers come from the real cosign 2.5 (Debian trixie): a key pair made
by `cosign generate-key-pair` (password "pw") and the signature `cosign sign`
put on an image, over the payload it pushed.
"""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from trustplane.crypto.signing import (
    PEM_TYPE,
    SIGNING_KEY_TYPES,
    SigningKey,
    decrypt_private_key,
    encrypt_private_key,
    generate_signing_key,
    is_encrypted_private_key,
    load_signing_key,
    load_verify_key,
)
from trustplane.errors import DecryptionKeyError, IntegrityError, MalformedError, UnsupportedError

COSIGN_KEY = b"""-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjo2NTUzNiwiciI6
OCwicCI6MX0sInNhbHQiOiIrQ0lTRmNGblErVkZ3Q2hpQ0Y4R2NudlU3Smt3K1R4
T0htMnNFVDZqdThJPSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiJhTldxRkd1TmxmVk9mT0lNK2NvL0wySFMvdk94SDd3UyJ9LCJj
aXBoZXJ0ZXh0IjoiS2xaTVBwWjlXdGNXTmdUZVVZVkFUQmlVMWdtU2JCRFZyZkhJ
TmdjRWNMRkdXVHJ4TkVuMFY4OTNCeHVQWDdjZ0V4ZWpNYjEvU1NvTk54U1JraXJx
Y2ZDRGlQQVA4VWh1OU5aSFVLS3pPOW81ZytLK2JnU3ozK0FWQWFxL3NkU05HQWhQ
dVdMSXpXSnczVjFrWmJxcUxQOVVUcnNrNWFNOVNFODdHT2NnMzZhVXlLdEtHSml4
TlZ5Q2RidGFNQTJNdytmeGJyQXNDaDNWc3c9PSJ9
-----END ENCRYPTED SIGSTORE PRIVATE KEY-----
"""
COSIGN_PUB = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE0oJZWEm7tun0TLvQ0utZbqH1/K/g
Q7xCzfB8Y5nydtfrPhq0LB/gb/6vjr9+mw1KQsHgpM41J1UaUoRya7wUdg==
-----END PUBLIC KEY-----
"""
COSIGN_PAYLOAD = (
    b'{"critical":{"identity":{"docker-reference":"127.0.0.1:33101/app"},'
    b'"image":{"docker-manifest-digest":"sha256:96ff873b34031e47c016746b3a01d9067cee60bfa1737339ec5c8a8d2442fee2"},'
    b'"type":"cosign container image signature"},"optional":null}'
)
COSIGN_SIGNATURE = base64.b64decode(
    "MEUCIQDaLaYHZsVbegLSSrT6KfiB66jFtqzk0ptnTYXJkQGjIwIgR/neLv0QRWEgaEj1Iuz5mOnrVwTGKSOlu5lEV69CPXo="
)
FAST = {"n": 1024}
"""Cheap scrypt for tests that are not about the parameters."""


def _pem_document(pem: bytes) -> dict[str, object]:
    lines = pem.decode().strip().splitlines()
    assert lines[0] == f"-----BEGIN {PEM_TYPE}-----"
    assert lines[-1] == f"-----END {PEM_TYPE}-----"
    document: dict[str, object] = json.loads(base64.b64decode("".join(lines[1:-1])))
    return document


def _repem(document: dict[str, object]) -> bytes:
    body = base64.b64encode(json.dumps(document).encode()).decode()
    return f"-----BEGIN {PEM_TYPE}-----\n{body}\n-----END {PEM_TYPE}-----\n".encode()


def test_a_key_cosign_generated_opens_and_matches_its_public_key() -> None:
    key = decrypt_private_key(COSIGN_KEY, b"pw", "cosign.key")
    assert key.public.public_pem() == COSIGN_PUB
    assert key.public.key_type == "ecdsa-p256"


def test_a_signature_cosign_made_verifies_and_a_changed_payload_does_not() -> None:
    public = load_verify_key(COSIGN_PUB, "cosign.pub")
    public.verify(COSIGN_PAYLOAD, COSIGN_SIGNATURE)
    tampered = COSIGN_PAYLOAD.replace(b"33101/app", b"33101/apq")
    with pytest.raises(IntegrityError, match=r"does not verify with cosign\.pub"):
        public.verify(tampered, COSIGN_SIGNATURE)


def test_the_written_key_has_cosigns_fields_and_parameters() -> None:
    key = generate_signing_key("ecdsa-p256")
    pem = encrypt_private_key(key, b"secret")
    assert all(len(line) <= 64 for line in pem.decode().splitlines()[1:-1])
    document = _pem_document(pem)
    assert set(document) == {"kdf", "cipher", "ciphertext"}
    kdf, cipher = document["kdf"], document["cipher"]
    assert isinstance(kdf, dict)
    assert isinstance(cipher, dict)
    assert kdf["name"] == "scrypt"
    assert kdf["params"] == {"N": 65536, "r": 8, "p": 1}  # what cosign 2.5 writes
    assert len(base64.b64decode(kdf["salt"])) == 32
    assert cipher["name"] == "nacl/secretbox"
    assert len(base64.b64decode(cipher["nonce"])) == 24
    # secretbox adds a 16-byte Poly1305 tag to the PKCS#8 DER
    ciphertext = base64.b64decode(str(document["ciphertext"]))
    assert len(ciphertext) == len(key.pkcs8_der()) + 16
    assert is_encrypted_private_key(pem)


@pytest.mark.parametrize("key_type", SIGNING_KEY_TYPES)
def test_round_trip_through_the_encrypted_format_then_sign_and_verify(key_type: str) -> None:
    key = generate_signing_key(key_type)  # type: ignore[arg-type]
    pem = encrypt_private_key(key, b"correct horse", **FAST)
    opened = decrypt_private_key(pem, b"correct horse", "k.key")
    assert opened.pkcs8_der() == key.pkcs8_der()
    payload = b'{"critical":{},"optional":null}'
    signature = opened.sign(payload)
    public = load_verify_key(key.public.public_pem(), "k.pub")
    public.verify(payload, signature)
    assert public.key_id == key.public.key_id
    assert public.key_id.startswith("sha256:")
    with pytest.raises(IntegrityError):
        public.verify(payload + b" ", signature)
    with pytest.raises(IntegrityError):
        public.verify(payload, bytes([signature[0] ^ 1]) + signature[1:])


def test_signature_encodings_are_the_ones_cosign_uses() -> None:
    payload = b"payload"
    ecdsa = generate_signing_key("ecdsa-p256")
    r, s = decode_dss_signature(ecdsa.sign(payload))  # ASN.1 DER, not raw r||s
    assert r > 0
    assert s > 0
    pub = ecdsa.key.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(ecdsa.sign(payload), payload, ec.ECDSA(hashes.SHA256()))
    ed = generate_signing_key("ed25519")
    assert isinstance(ed.key, ed25519.Ed25519PrivateKey)
    ed.key.public_key().verify(ed.sign(payload), payload)  # pure Ed25519 over the payload
    rsa_key = generate_signing_key("rsa")
    assert isinstance(rsa_key.key, rsa.RSAPrivateKey)
    assert rsa_key.key.key_size == 3072
    from cryptography.hazmat.primitives.asymmetric import padding

    rsa_key.key.public_key().verify(
        rsa_key.sign(payload), payload, padding.PKCS1v15(), hashes.SHA256()
    )


def test_a_wrong_password_is_a_clear_error() -> None:
    pem = encrypt_private_key(generate_signing_key("ed25519"), b"right", **FAST)
    with pytest.raises(DecryptionKeyError, match="wrong password"):
        decrypt_private_key(pem, b"wrong", "signer.key")
    with pytest.raises(DecryptionKeyError, match="wrong password"):
        decrypt_private_key(COSIGN_KEY, b"not pw", "cosign.key")


def test_an_altered_ciphertext_or_salt_is_refused() -> None:
    pem = encrypt_private_key(generate_signing_key("ecdsa-p256"), b"pw", **FAST)
    document = _pem_document(pem)
    ciphertext = bytearray(base64.b64decode(str(document["ciphertext"])))
    ciphertext[20] ^= 0x01
    altered = {**document, "ciphertext": base64.b64encode(bytes(ciphertext)).decode()}
    with pytest.raises(DecryptionKeyError):
        decrypt_private_key(_repem(altered), b"pw", "k")
    kdf = dict(document["kdf"])  # type: ignore[call-overload]
    kdf["salt"] = base64.b64encode(b"\0" * 32).decode()
    with pytest.raises(DecryptionKeyError):
        decrypt_private_key(_repem({**document, "kdf": kdf}), b"pw", "k")


def test_cosign_1_pem_type_is_read_too() -> None:
    pem = encrypt_private_key(generate_signing_key("ecdsa-p256"), b"pw", **FAST)
    legacy = pem.replace(b"SIGSTORE", b"COSIGN")
    assert decrypt_private_key(legacy, b"pw", "old.key").public.key_type == "ecdsa-p256"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"kdf": {"name": "argon2"}}, UnsupportedError),
        ({"cipher": {"name": "aes-gcm", "nonce": "AAAA"}}, UnsupportedError),
        ({"ciphertext": "not base64!"}, MalformedError),
        ({"ciphertext": None}, MalformedError),
    ],
)
def test_malformed_documents_are_refused(change: dict[str, object], error: type[Exception]) -> None:
    document = _pem_document(encrypt_private_key(generate_signing_key("ed25519"), b"pw", **FAST))
    with pytest.raises(error):
        decrypt_private_key(_repem({**document, **change}), b"pw", "k")


@pytest.mark.parametrize(
    "params",
    [
        {"N": 1 << 24, "r": 8, "p": 1},  # 16 GiB of memory: a hostile file
        {"N": 1000, "r": 8, "p": 1},  # not a power of two
        {"N": 0, "r": 8, "p": 1},
        {"N": "65536", "r": 8, "p": 1},
    ],
)
def test_scrypt_parameters_out_of_bounds_are_refused(params: dict[str, object]) -> None:
    document = _pem_document(encrypt_private_key(generate_signing_key("ed25519"), b"pw", **FAST))
    kdf = {**document["kdf"], "params": params}  # type: ignore[dict-item]
    with pytest.raises((UnsupportedError, MalformedError)):
        decrypt_private_key(_repem({**document, "kdf": kdf}), b"pw", "k")


def test_garbage_is_malformed_not_a_crash() -> None:
    with pytest.raises(MalformedError):
        decrypt_private_key(b"hello", b"pw", "k")
    with pytest.raises(MalformedError):
        load_verify_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "k")
    with pytest.raises(MalformedError):
        load_signing_key(b"not a key", "k", None)


def test_load_signing_key_reads_both_forms_and_asks_for_a_password() -> None:
    key = generate_signing_key("ecdsa-p256")
    encrypted = encrypt_private_key(key, b"pw", **FAST)
    with pytest.raises(DecryptionKeyError, match="give its password"):
        load_signing_key(encrypted, "k", None)
    assert load_signing_key(encrypted, "k", b"pw").pkcs8_der() == key.pkcs8_der()
    plain = key.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert load_signing_key(plain, "k", None).pkcs8_der() == key.pkcs8_der()


def test_keys_cosign_would_not_use_are_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(UnsupportedError, match="P-256"):
        load_verify_key(
            p384.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "p384.pub",
        )
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = weak.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(UnsupportedError, match="2048"):
        load_signing_key(pem, "weak.pem", None)
    with pytest.raises(UnsupportedError):
        encrypt_private_key(SigningKey(p384, "x"), b"pw", **FAST)
