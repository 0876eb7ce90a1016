"""The node's TPM, through tpm2-pytss (ESAPI), chosen by a TCTI string.

- EK: the TCG default RSA 2048 template (EK credential profile), created as
  the endorsement hierarchy's primary key; its certificate is read from NV
  when the TPM has one.
- AK: a restricted ECDSA P-256 signing key, primary in the endorsement
  hierarchy (deterministic, so nothing secret is stored on disk).
- PCR_Extend into the sha256 bank (never PCR_Reset: the agent has no use
  for it), ReadClock, Quote with a nonce, ActivateCredential,
  and a TPM-made signature over the transport key (TPM2_Hash then Sign: a
  restricted key signs only data the TPM hashed and found not to start with
  TPM_GENERATED_VALUE, so it cannot be made to forge a quote).

swtpm (and many TPMs) hold only three loaded objects and no resource
manager: every transient handle is flushed after use.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

# The ESAPI logs every TPM error code it sees (including "no such NV index"
# while looking for an EK certificate) to stderr; errors reach us as exceptions.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_ECC, TPM2_SE, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_PCR_SELECTION,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TPMU_HA,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from trustplane.errors import UnavailableError

_EK_RSA_CERT_INDEX = 0x01C00002


@dataclass(frozen=True)
class Identity:
    ek_public: bytes
    """TPMT_PUBLIC of the EK, as marshalled by the TPM."""
    ek_cert: bytes | None
    ak_public: bytes
    ak_name: bytes


@dataclass(frozen=True)
class Boot:
    """The TPM's clock information: a boot is one (reset_count, restart_count)."""

    reset_count: int
    restart_count: int
    clock: int
    """Milliseconds the TPM has run (kept across boots, roughly)."""

    @property
    def counters(self) -> tuple[int, int]:
        return (self.reset_count, self.restart_count)


@dataclass(frozen=True)
class QuoteResult:
    attest: bytes
    """TPMS_ATTEST."""
    signature: bytes
    """TPMT_SIGNATURE."""


def ak_template() -> TPM2B_PUBLIC:
    attrs = (
        TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
    )
    public = TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs)
    public.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL
    public.parameters.eccDetail.scheme.scheme = TPM2_ALG.ECDSA
    public.parameters.eccDetail.scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    public.parameters.eccDetail.curveID = TPM2_ECC.NIST_P256
    public.parameters.eccDetail.kdf.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(publicArea=public)


def _sha256_selection(pcrs: tuple[int, ...]) -> TPML_PCR_SELECTION:
    bitmap = bytearray(3)
    for pcr in pcrs:
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    selection = TPMS_PCR_SELECTION(hash=TPM2_ALG.SHA256, sizeofSelect=3)
    selection.pcrSelect = bytes(bitmap)
    return TPML_PCR_SELECTION(pcrSelections=[selection])


class Tpm:
    """One connection to a TPM; not thread-safe (the TPM is one device)."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        try:
            self._esapi = ESAPI(TCTILdr.parse(tcti))
        except TSS2_Exception as exc:
            raise UnavailableError(f"cannot open the TPM at {tcti!r}: {exc}") from None
        self._ak: ESYS_TR | None = None
        self._closed = False

    def close(self) -> None:
        """Flush the AK and close the connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._ak is not None:
            self._flush(self._ak)
            self._ak = None
        self._esapi.close()

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _flush(self, handle: ESYS_TR) -> None:
        with suppress(TSS2_Exception):
            self._esapi.flush_context(handle)

    def _nv_read(self, index: Any) -> bytes:
        try:
            handle = self._esapi.tr_from_tpmpublic(index)
        except TSS2_Exception:
            raise NoSuchIndex(index) from None
        nv_public, _ = self._esapi.nv_read_public(handle)
        size = nv_public.nvPublic.dataSize
        data = b""
        while len(data) < size:
            chunk = min(size - len(data), 1024)
            data += bytes(self._esapi.nv_read(handle, chunk, len(data), ESYS_TR.RH_OWNER))
        return data

    @contextmanager
    def _ek(self) -> Iterator[tuple[ESYS_TR, bytes, bytes | None]]:
        cert, template = create_ek_template("EK-RSA2048", self._nv_read)
        handle, public, _, _, _ = self._esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        try:
            yield handle, public.publicArea.marshal(), cert
        finally:
            self._flush(handle)

    def _ak_handle(self) -> tuple[ESYS_TR, bytes]:
        if self._ak is None:
            handle, public, _, _, _ = self._esapi.create_primary(
                None, ak_template(), ESYS_TR.ENDORSEMENT
            )
            self._ak = handle
            self._ak_public = bytes(public.publicArea.marshal())
        return self._ak, self._ak_public

    def identity(self) -> Identity:
        with self._ek() as (_, ek_public, cert):
            pass
        _, ak_public = self._ak_handle()
        name = TPM2_ALG.SHA256.to_bytes(2, "big") + hashlib.sha256(ak_public).digest()
        return Identity(ek_public=bytes(ek_public), ek_cert=cert, ak_public=ak_public, ak_name=name)

    def activate_credential(self, blob: bytes, secret: bytes) -> bytes:
        """Recover a credential made for this TPM's EK and AK."""
        ak, _ = self._ak_handle()
        with self._ek() as (ek, _, _):
            session = self._esapi.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )
            try:
                self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
                digest = self._esapi.activate_credential(
                    ak,
                    ek,
                    TPM2B_ID_OBJECT(credential=blob),
                    TPM2B_ENCRYPTED_SECRET(secret=secret),
                    session1=ESYS_TR.PASSWORD,
                    session2=session,
                )
            finally:
                self._flush(session)
        return bytes(digest)

    def extend(self, pcr: int, digest: bytes) -> None:
        values = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]
        )
        self._esapi.pcr_extend(getattr(ESYS_TR, f"PCR{pcr}"), values)

    def read(self, pcr: int) -> bytes:
        """The PCR's current value in the sha256 bank."""
        _, _, values = self._esapi.pcr_read(_sha256_selection((pcr,)))
        return bytes(values[0])

    def boot(self) -> Boot:
        """TPM2_ReadClock: which boot of the TPM this is (never obfuscated)."""
        info = self._esapi.read_clock().clockInfo
        return Boot(int(info.resetCount), int(info.restartCount), int(info.clock))

    def quote(self, nonce: bytes, pcrs: tuple[int, ...]) -> QuoteResult:
        ak, _ = self._ak_handle()
        attest, signature = self._esapi.quote(
            ak, _sha256_selection(pcrs), nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        )
        return QuoteResult(attest=bytes(attest), signature=bytes(signature.marshal()))

    def sign_external(self, data: bytes) -> bytes:
        """The AK's TPMT_SIGNATURE over sha256(data), data hashed by the TPM."""
        ak, _ = self._ak_handle()
        digest, ticket = self._esapi.hash(data, TPM2_ALG.SHA256, ESYS_TR.OWNER)
        if ticket.tag != TPM2_ST.HASHCHECK:
            ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=ESYS_TR.OWNER)
        signature = self._esapi.sign(ak, digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), ticket)
        return bytes(signature.marshal())
