"""TPM 2.0 structures and the verifier's cryptography, in pure Python.

Only what a remote verifier needs, on `cryptography` alone (no TSS):

- TPMT_PUBLIC parsing (RSA and ECC keys) and object Names;
- MakeCredential (TPM 2.0 Part 1 §24, Part 3 §12.6): the seed sealed to the
  EK (RSA-OAEP, label "IDENTITY\\0"; or ECDH + KDFe for an ECC EK), KDFa for
  the symmetric and HMAC keys (Part 1 §11.4.10), AES-CFB of the credential,
  the outer HMAC over (encIdentity || Name);
- TPMS_ATTEST quote parsing and TPMT_SIGNATURE checks (RSASSA, RSAPSS, ECDSA);
- the attestation key's attribute check.

Written by hand because no well-kept pure-Python library does this (tpm2-pytss
needs the TSS C libraries, which the verifier must not depend on). Layouts
follow the TCG specification, as google/go-tpm and tpm2-tools marshal them.
Every parse is strict: a short or over-long structure raises MalformedError.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # CFB moved to the "decrepit" package in cryptography 44; the TPM needs it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from trustplane.errors import IntegrityError, MalformedError, UnsupportedError

# TPM_ALG_ID
ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_AES = 0x0006
ALG_KEYEDHASH = 0x0008
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018
ALG_ECC = 0x0023
ALG_CFB = 0x0043

ECC_NIST_P256 = 0x0003
ECC_NIST_P384 = 0x0004
ECC_NIST_P521 = 0x0005

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

# TPMA_OBJECT bits
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN_ENCRYPT = 1 << 18

_HASHES: dict[int, tuple[str, hashes.HashAlgorithm]] = {
    ALG_SHA1: ("sha1", hashes.SHA1()),  # noqa: S303 - a TPM bank, never chosen by us
    ALG_SHA256: ("sha256", hashes.SHA256()),
    ALG_SHA384: ("sha384", hashes.SHA384()),
    ALG_SHA512: ("sha512", hashes.SHA512()),
}
_CURVES: dict[int, ec.EllipticCurve] = {
    ECC_NIST_P256: ec.SECP256R1(),
    ECC_NIST_P384: ec.SECP384R1(),
    ECC_NIST_P521: ec.SECP521R1(),
}


def hash_name(alg: int) -> str:
    try:
        return _HASHES[alg][0]
    except KeyError:
        raise UnsupportedError(f"unsupported TPM hash algorithm 0x{alg:04x}") from None


def digest(alg: int, data: bytes) -> bytes:
    return hashlib.new(hash_name(alg), data).digest()


def digest_size(alg: int) -> int:
    return hashlib.new(hash_name(alg)).digest_size


class Reader:
    """Big-endian TPM unmarshalling over a byte string; strict about length."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.offset = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.offset + n > len(self.data):
            raise MalformedError(f"{self.what}: truncated at byte {self.offset}")
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack(">Q", self.take(8))[0]
        return value

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self.offset != len(self.data):
            raise MalformedError(f"{self.what}: {len(self.data) - self.offset} trailing bytes")


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def unwrap_tpm2b(data: bytes, what: str) -> bytes:
    """The body of a TPM2B_* (size-prefixed) structure, e.g. TPM2B_PUBLIC."""
    reader = Reader(data, what)
    body = reader.tpm2b()
    reader.end()
    return body


# -- public areas -----------------------------------------------------------------


@dataclass(frozen=True)
class PublicArea:
    """A parsed TPMT_PUBLIC (the bytes it came from are kept for its Name)."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int]
    """(algorithm, keyBits, mode); (ALG_NULL, 0, 0) if none."""
    scheme: int
    scheme_hash: int
    rsa_bits: int = 0
    rsa_exponent: int = 0
    rsa_modulus: bytes = b""
    curve: int = 0
    ecc_x: bytes = b""
    ecc_y: bytes = b""

    @property
    def name(self) -> bytes:
        """TPM2B_NAME body: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + digest(self.name_alg, self.raw)

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        if self.type == ALG_RSA:
            exponent = self.rsa_exponent or 65537
            return rsa.RSAPublicNumbers(exponent, int.from_bytes(self.rsa_modulus)).public_key()
        curve = _CURVES.get(self.curve)
        if curve is None:
            raise UnsupportedError(f"unsupported TPM curve 0x{self.curve:04x}")
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(self.ecc_x), int.from_bytes(self.ecc_y), curve
        )
        try:
            return numbers.public_key()
        except ValueError:
            raise MalformedError("the ECC public point is not on its curve") from None


def parse_public(data: bytes) -> PublicArea:
    """Parse a TPMT_PUBLIC (give the body of a TPM2B_PUBLIC, not its size prefix)."""
    r = Reader(data, "TPMT_PUBLIC")
    kind = r.u16()
    name_alg = r.u16()
    hash_name(name_alg)
    attributes = r.u32()
    auth_policy = r.tpm2b()
    if kind not in (ALG_RSA, ALG_ECC):
        raise UnsupportedError(f"unsupported TPM key type 0x{kind:04x} (RSA and ECC only)")
    sym_alg = r.u16()
    symmetric = (ALG_NULL, 0, 0)
    if sym_alg != ALG_NULL:
        symmetric = (sym_alg, r.u16(), r.u16())
    scheme = r.u16()
    scheme_hash = ALG_NULL
    if scheme != ALG_NULL:
        if scheme == 0x001A:  # ECDAA carries a count as well
            raise UnsupportedError("ECDAA keys are not supported")
        scheme_hash = r.u16()
    # The unique part (TPMU_PUBLIC_PARMS and TPMU_PUBLIC_ID) of each key type;
    # the other type's fields keep their empty defaults.
    bits = exponent = curve = 0
    modulus = x = y = b""
    if kind == ALG_RSA:
        bits = r.u16()
        exponent = r.u32()
        modulus = r.tpm2b()
    else:
        curve = r.u16()
        if r.u16() != ALG_NULL:  # the KDF's scheme, then its hash
            r.u16()
        x = r.tpm2b()
        y = r.tpm2b()
    r.end()
    if kind == ALG_RSA and len(modulus) * 8 != bits:
        raise MalformedError("TPMT_PUBLIC: RSA modulus size does not match keyBits")
    return PublicArea(
        raw=data,
        type=kind,
        name_alg=name_alg,
        attributes=attributes,
        auth_policy=auth_policy,
        symmetric=symmetric,
        scheme=scheme,
        scheme_hash=scheme_hash,
        rsa_bits=bits,
        rsa_exponent=exponent,
        rsa_modulus=modulus,
        curve=curve,
        ecc_x=x,
        ecc_y=y,
    )


AK_REQUIRED = RESTRICTED | SIGN_ENCRYPT | FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN


def check_ak(ak: PublicArea) -> None:
    """An attestation key must be a restricted signing key born in and bound
    to its TPM: otherwise what it signs says nothing about the TPM."""
    missing = [
        name
        for bit, name in (
            (RESTRICTED, "restricted"),
            (SIGN_ENCRYPT, "sign"),
            (FIXED_TPM, "fixedTPM"),
            (FIXED_PARENT, "fixedParent"),
            (SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
        )
        if not ak.attributes & bit
    ]
    if missing:
        raise IntegrityError(f"the AK lacks the attributes {', '.join(missing)}")
    if ak.attributes & DECRYPT:
        raise IntegrityError("the AK is also a decryption key")


def check_ek(ek: PublicArea) -> None:
    """An EK is a restricted decryption key with a symmetric (AES-CFB) scheme."""
    if not (ek.attributes & RESTRICTED and ek.attributes & DECRYPT):
        raise IntegrityError("the EK is not a restricted decryption key")
    if not ek.attributes & FIXED_TPM:
        raise IntegrityError("the EK is not fixedTPM")
    alg, bits, mode = ek.symmetric
    if alg != ALG_AES or mode != ALG_CFB or bits not in (128, 192, 256):
        raise UnsupportedError("the EK's symmetric scheme is not AES-CFB")


# -- key derivation ----------------------------------------------------------------


def kdfa(
    alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa (SP 800-108 counter mode with HMAC), TPM 2.0 Part 1 §11.4.10.2."""
    label = label if label.endswith(b"\0") else label + b"\0"
    name = hash_name(alg)
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(
            key,
            struct.pack(">I", counter) + label + context_u + context_v + struct.pack(">I", bits),
            name,
        ).digest()
    return out[: (bits + 7) // 8]


def kdfe(alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe (SP 800-56A concatenation KDF), TPM 2.0 Part 1 §11.4.10.3."""
    label = label if label.endswith(b"\0") else label + b"\0"
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += digest(alg, struct.pack(">I", counter) + z + label + party_u + party_v)
    return out[: (bits + 7) // 8]


# -- MakeCredential ----------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """What TPM2_MakeCredential returns: both are TPM2B bodies."""

    blob: bytes
    """TPM2B_ID_OBJECT body: TPM2B_DIGEST(outer HMAC) || encIdentity."""
    secret: bytes
    """TPM2B_ENCRYPTED_SECRET body: the seed sealed to the EK."""


def make_credential(ek: PublicArea, object_name: bytes, credential: bytes) -> Credential:
    """Seal `credential` so that only the TPM holding `ek` and the object named
    `object_name` can recover it (with TPM2_ActivateCredential)."""
    check_ek(ek)
    size = digest_size(ek.name_alg)
    if len(credential) > size:
        raise MalformedError(f"a credential holds at most {size} bytes")
    if ek.type == ALG_RSA:
        seed = os.urandom(size)
        key = ek.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        algorithm = _HASHES[ek.name_alg][1]
        secret = key.encrypt(
            seed,
            padding.OAEP(
                mgf=padding.MGF1(algorithm=algorithm), algorithm=algorithm, label=b"IDENTITY\0"
            ),
        )
    else:
        ek_key = ek.public_key()
        assert isinstance(ek_key, ec.EllipticCurvePublicKey)
        ephemeral = ec.generate_private_key(ek_key.curve)
        z = ephemeral.exchange(ec.ECDH(), ek_key)
        width = (ek_key.curve.key_size + 7) // 8
        numbers = ephemeral.public_key().public_numbers()
        ex, ey = numbers.x.to_bytes(width), numbers.y.to_bytes(width)
        seed = kdfe(ek.name_alg, z, b"IDENTITY", ex, ek.ecc_x, size * 8)
        secret = tpm2b(ex) + tpm2b(ey)
    return Credential(blob=_credential_blob(ek, seed, object_name, credential), secret=secret)


def _credential_blob(ek: PublicArea, seed: bytes, object_name: bytes, credential: bytes) -> bytes:
    size = digest_size(ek.name_alg)
    sym_key = kdfa(ek.name_alg, seed, b"STORAGE", object_name, b"", ek.symmetric[1])
    encryptor = Cipher(algorithms.AES(sym_key), CFB(b"\0" * 16)).encryptor()
    enc_identity = encryptor.update(tpm2b(credential)) + encryptor.finalize()
    hmac_key = kdfa(ek.name_alg, seed, b"INTEGRITY", b"", b"", size * 8)
    outer = hmac.new(hmac_key, enc_identity + object_name, hash_name(ek.name_alg)).digest()
    return tpm2b(outer) + enc_identity


def open_credential_blob(ek: PublicArea, seed: bytes, object_name: bytes, blob: bytes) -> bytes:
    """The inverse of the blob step, given the seed (tests, and cross-checks
    of credentials made by other implementations)."""
    r = Reader(blob, "TPM2B_ID_OBJECT")
    outer = r.tpm2b()
    enc_identity = r.take(len(blob) - r.offset)
    hmac_key = kdfa(ek.name_alg, seed, b"INTEGRITY", b"", b"", digest_size(ek.name_alg) * 8)
    expected = hmac.new(hmac_key, enc_identity + object_name, hash_name(ek.name_alg)).digest()
    if not hmac.compare_digest(outer, expected):
        raise IntegrityError("the credential blob's integrity HMAC does not match")
    sym_key = kdfa(ek.name_alg, seed, b"STORAGE", object_name, b"", ek.symmetric[1])
    decryptor = Cipher(algorithms.AES(sym_key), CFB(b"\0" * 16)).decryptor()
    plain = decryptor.update(enc_identity) + decryptor.finalize()
    return unwrap_tpm2b(plain, "credential")


# -- quotes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Quote:
    """A parsed TPMS_ATTEST of type quote."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selection: tuple[tuple[int, tuple[int, ...]], ...]
    """((hash alg, (pcr indices ascending)), ...) in the quote's order."""
    pcr_digest: bytes


def parse_quote(data: bytes) -> Quote:
    r = Reader(data, "TPMS_ATTEST")
    if r.u32() != TPM_GENERATED_VALUE:
        raise IntegrityError("the attestation does not come from a TPM (magic)")
    if r.u16() != TPM_ST_ATTEST_QUOTE:
        raise IntegrityError("the attestation is not a quote")
    signer = r.tpm2b()
    extra = r.tpm2b()
    clock, resets, restarts, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    count = r.u32()
    if count > 16:
        raise MalformedError("TPMS_ATTEST: too many PCR banks")
    selection = []
    for _ in range(count):
        alg = r.u16()
        bitmap = r.take(r.u8())
        pcrs = tuple(
            byte * 8 + bit
            for byte, bits in enumerate(bitmap)
            for bit in range(8)
            if bits >> bit & 1
        )
        selection.append((alg, pcrs))
    pcr_digest = r.tpm2b()
    r.end()
    return Quote(
        qualified_signer=signer,
        extra_data=extra,
        clock=clock,
        reset_count=resets,
        restart_count=restarts,
        safe=bool(safe),
        firmware_version=firmware,
        pcr_selection=tuple(selection),
        pcr_digest=pcr_digest,
    )


def verify_signature(key: PublicArea, message: bytes, signature: bytes) -> int:
    """Check a TPMT_SIGNATURE over `message`; return the hash algorithm used."""
    r = Reader(signature, "TPMT_SIGNATURE")
    sig_alg = r.u16()
    hash_alg = r.u16()
    algorithm = _HASHES.get(hash_alg)
    if algorithm is None:
        raise UnsupportedError(f"unsupported signature hash 0x{hash_alg:04x}")
    public = key.public_key()
    try:
        if sig_alg in (ALG_RSASSA, ALG_RSAPSS):
            raw = r.tpm2b()
            r.end()
            if not isinstance(public, rsa.RSAPublicKey):
                raise IntegrityError("an RSA signature from a non-RSA key")
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if sig_alg == ALG_RSASSA
                else padding.PSS(mgf=padding.MGF1(algorithm[1]), salt_length=padding.PSS.AUTO)
            )
            public.verify(raw, message, pad, algorithm[1])
        elif sig_alg == ALG_ECDSA:
            sig_r = int.from_bytes(r.tpm2b())
            sig_s = int.from_bytes(r.tpm2b())
            r.end()
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise IntegrityError("an ECDSA signature from a non-ECC key")
            public.verify(encode_dss_signature(sig_r, sig_s), message, ec.ECDSA(algorithm[1]))
        else:
            raise UnsupportedError(f"unsupported signature scheme 0x{sig_alg:04x}")
    except InvalidSignature:
        raise IntegrityError("the signature does not verify with the AK") from None
    if key.scheme != ALG_NULL and (key.scheme, key.scheme_hash) != (sig_alg, hash_alg):
        raise IntegrityError("the signature's scheme is not the AK's")
    return hash_alg


def pcr_digest(alg: int, values: list[bytes]) -> bytes:
    """The quote's pcrDigest: H(PCR values concatenated in selection order)."""
    return digest(alg, b"".join(values))
