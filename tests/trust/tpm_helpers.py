"""Software stand-ins for TPM keys: marshalled TPMT_PUBLIC areas and quotes
made with `cryptography` keys, for tests of the verifier's checks."""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from trustplane.trust import tpm

# TCG default EK policy: PolicySecret(TPM_RH_ENDORSEMENT).
EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
EK_ATTRS = 0x000300B2
AK_ATTRS = tpm.RESTRICTED | tpm.SIGN_ENCRYPT | tpm.FIXED_TPM | tpm.FIXED_PARENT
AK_ATTRS |= tpm.SENSITIVE_DATA_ORIGIN | tpm.USER_WITH_AUTH


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def rsa_ek_public(key: rsa.RSAPublicKey) -> bytes:
    n = key.public_numbers().n.to_bytes(key.key_size // 8)
    return (
        u16(tpm.ALG_RSA)
        + u16(tpm.ALG_SHA256)
        + struct.pack(">I", EK_ATTRS)
        + tpm.tpm2b(EK_POLICY)
        + u16(tpm.ALG_AES)
        + u16(128)
        + u16(tpm.ALG_CFB)
        + u16(tpm.ALG_NULL)
        + u16(key.key_size)
        + struct.pack(">I", 0)
        + tpm.tpm2b(n)
    )


def ecc_public(
    key: ec.EllipticCurvePublicKey, attrs: int, *, ek: bool, scheme: int = tpm.ALG_NULL
) -> bytes:
    numbers = key.public_numbers()
    symmetric = u16(tpm.ALG_AES) + u16(128) + u16(tpm.ALG_CFB) if ek else u16(tpm.ALG_NULL)
    scheme_bytes = u16(scheme) + (u16(tpm.ALG_SHA256) if scheme != tpm.ALG_NULL else b"")
    return (
        u16(tpm.ALG_ECC)
        + u16(tpm.ALG_SHA256)
        + struct.pack(">I", attrs)
        + tpm.tpm2b(EK_POLICY if ek else b"")
        + symmetric
        + scheme_bytes
        + u16(tpm.ECC_NIST_P256)
        + u16(tpm.ALG_NULL)
        + tpm.tpm2b(numbers.x.to_bytes(32))
        + tpm.tpm2b(numbers.y.to_bytes(32))
    )


def ak_public(key: ec.EllipticCurvePrivateKey, attrs: int = AK_ATTRS) -> bytes:
    return ecc_public(key.public_key(), attrs, ek=False, scheme=tpm.ALG_ECDSA)


def attest(
    signer_name: bytes,
    nonce: bytes,
    pcr_values: list[bytes],
    pcrs: tuple[int, ...] = (13,),
    *,
    clock: int = 1000,
    reset_count: int = 1,
    restart_count: int = 0,
) -> bytes:
    bitmap = bytearray(3)
    for pcr in pcrs:
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return (
        struct.pack(">IH", tpm.TPM_GENERATED_VALUE, tpm.TPM_ST_ATTEST_QUOTE)
        + tpm.tpm2b(signer_name)
        + tpm.tpm2b(nonce)
        + struct.pack(">QIIB", clock, reset_count, restart_count, 1)
        + struct.pack(">Q", 0x2023)
        + struct.pack(">I", 1)
        + u16(tpm.ALG_SHA256)
        + bytes([3])
        + bytes(bitmap)
        + tpm.tpm2b(hashlib.sha256(b"".join(pcr_values)).digest())
    )


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return (
        u16(tpm.ALG_ECDSA)
        + u16(tpm.ALG_SHA256)
        + tpm.tpm2b(r.to_bytes(32))
        + tpm.tpm2b(s.to_bytes(32))
    )
