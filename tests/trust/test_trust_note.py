"""C2SP signed notes against golang.org/x/mod/sumdb/note and transparency-dev/formats vectors."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustplane.errors import IntegrityError, MalformedError, UsageError
from trustplane.trust.note import (
    MAX_SIGNATURES,
    NoteSigner,
    NoteVerifier,
    open_note,
    parse_signer_key,
    parse_verifier_key,
    sign_note,
)

# golang/mod, sumdb/note/note_test.go: keys, text and signatures.
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNX"
    "gKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oO"
    "TGwnWLox33WWd1RvMc+QQ=\n"
)

# transparency-dev/formats, log/note_test.go: key pairs made by Go's note.GenerateKey.
GO_KEY_PAIRS = [
    (
        "Log+2271c621+AemuH5ooBpEPcr+W8onrjA1NfuzBVHdezakU81Ekarvs",
        "PRIVATE+KEY+Log+2271c621+AdEIq9FLRQni54Wg68T96VJO+iayOaulswav2DUMKgvQ",
    ),
    (
        "Known+451c786d+AXAQ0T7lbwuY4ABJ9/MYY9bWV3hmSyOGVt2x42NkmdUH",
        "PRIVATE+KEY+Known+451c786d+AQPRoE2+Z+Ed1HaHBA9F/FfracvcZ2rDU39kCecMEoci",
    ),
    (
        "KnownAgain+4893b26c+AQ+LR7BFF/F/dkpIBjBpSvT0crkteizuUkavAoGeaYMj",
        "PRIVATE+KEY+KnownAgain+4893b26c+ARhZda/l25zjGZswYLDZsLNRzNpmv5wYTN9IoTr1OJ2+",
    ),
    (
        "Unknown+fdbb2e08+AWgRIYZ+8x1Vl+1Q+sR8zciNHiYI1SdlBjNw+RV0rots",
        "PRIVATE+KEY+Unknown+fdbb2e08+Aav2knTC6orbhXX8pMWuNiWgO+Wwk2DB+h1eU2Q1W1nU",
    ),
]


def peter() -> NoteVerifier:
    return parse_verifier_key(PETER_VKEY)


def enoch() -> NoteVerifier:
    return parse_verifier_key(ENOCH_VKEY)


def opens(note: str, *verifiers: NoteVerifier) -> list[str]:
    return [v.name for v in open_note(note.encode(), verifiers).signed_by]


def test_verifier_key_round_trips() -> None:
    verifier = peter()
    assert verifier.name == "PeterNeumann"
    assert verifier.key_id == bytes.fromhex("c74f20a3")
    assert verifier.verifier_key() == PETER_VKEY


def mangled(key: str) -> list[str]:
    """note_test.go TestNewVerifier/TestNewSigner: every proper substring, every byte + 1."""
    out = {key[i:j] for i in range(len(key) + 1) for j in range(i + 1, len(key) + 1)}
    out.discard(key)
    raw = key.encode()
    for i in range(len(raw)):
        out.add((raw[:i] + bytes([raw[i] + 1]) + raw[i + 1 :]).decode())
    return sorted(out)


def test_every_mangled_verifier_key_is_refused() -> None:
    for bad in mangled(PETER_VKEY):
        with pytest.raises(MalformedError):
            parse_verifier_key(bad)
    for bad in [
        # note_test.go: wrong key length, then unknown algorithm, each with adjusted key hash.
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        # Python's int() would take these; Go's ParseUint and this parser do not.
        "PeterNeumann+0xc74f20+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74_f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        PETER_VKEY + "\n",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ]:
        with pytest.raises(MalformedError):
            parse_verifier_key(bad)


def test_every_mangled_signer_key_is_refused() -> None:
    signer = parse_signer_key(PETER_SKEY)
    assert signer.verifier_key() == PETER_VKEY
    for bad in mangled(PETER_SKEY):
        with pytest.raises(MalformedError):
            parse_signer_key(bad)


@pytest.mark.parametrize(("vkey", "skey"), GO_KEY_PAIRS)
def test_go_generated_key_pairs_agree(vkey: str, skey: str) -> None:
    assert parse_signer_key(skey).verifier_key() == vkey
    assert parse_verifier_key(vkey).verifier_key() == vkey


def test_sign_is_byte_identical_to_go() -> None:
    """note_test.go TestSign: Ed25519 is deterministic, so the whole note must match."""
    note = sign_note(TEXT.encode(), parse_signer_key(PETER_SKEY))
    assert note.decode() == TEXT + "\n" + PETER_SIG


def test_sign_refuses_bad_text() -> None:
    signer = parse_signer_key(PETER_SKEY)
    for bad in [b"abc", b"", b"a\x01b\n", b"\xff\n", b"tab\there\n"]:
        with pytest.raises(MalformedError):
            sign_note(bad, signer)
    with pytest.raises(UsageError):
        sign_note(TEXT.encode())
    for name in ["", "a b", "a+b", "a\u00a0b", "a\ud800", "a\x01"]:
        with pytest.raises(UsageError):
            NoteSigner(name, Ed25519PrivateKey.generate())


def test_open_one_known_one_unknown() -> None:
    """note_test.go TestOpen: unknown signatures are ignored, known ones are checked."""
    note = TEXT + "\n" + PETER_SIG + ENOCH_SIG
    opened = open_note(note.encode(), [peter()])
    assert opened.text == TEXT.encode()
    assert [v.name for v in opened.signed_by] == ["PeterNeumann"]
    assert opens(note, peter(), enoch()) == ["PeterNeumann", "EnochRoot"]
    assert opens(note, enoch()) == ["EnochRoot"]
    with pytest.raises(IntegrityError, match="no signature from a trusted key"):
        opens(note)


def test_open_with_duplicates() -> None:
    assert opens(TEXT + "\n" + ENOCH_SIG, enoch(), peter(), enoch()) == ["EnochRoot"]
    assert opens(TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG, peter()) == [
        "PeterNeumann"
    ]


def test_open_refuses_an_ambiguous_verifier_list() -> None:
    impostor = NoteVerifier("EnochRoot", enoch().key_id, peter().public_key)
    with pytest.raises(UsageError, match="share the name and ID"):
        opens(TEXT + "\n" + PETER_SIG, enoch(), impostor)


def test_open_signature_count_limit() -> None:
    with pytest.raises(MalformedError, match="too many"):
        opens(TEXT + "\n" + PETER_SIG * (MAX_SIGNATURES + 1), peter())
    with pytest.raises(MalformedError, match="too many"):
        opens(TEXT + "\n" + PETER_SIG * (MAX_SIGNATURES + 1))
    assert opens(TEXT + "\n" + PETER_SIG * 16, peter()) == ["PeterNeumann"]


def test_open_invalid_signature_of_a_known_key() -> None:
    """note_test.go: 'ABCD' inserted after the key ID keeps name and ID, breaks the signature."""
    with pytest.raises(IntegrityError, match=r"PeterNeumann\+c74f20a3"):
        opens(TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:], peter())


def test_a_bad_repeat_of_a_known_signature_rejects_the_note() -> None:
    """The spec says verify every known-key signature; Go skips repeats unchecked."""
    bad = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(IntegrityError):
        opens(TEXT + "\n" + PETER_SIG + bad, peter())


def test_unknown_mangled_signatures_are_ignored() -> None:
    enoch_bad = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    note = TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_bad
    assert opens(note, peter()) == ["PeterNeumann"]


def test_open_malformed_notes() -> None:
    """note_test.go TestOpen badMsgs, plus format rules of c2sp.org/signed-note."""
    bad_notes = [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT + "\n— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKv"
        "qfqdngotpRZb6KE6RyyBwJnAM=",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG + "\n",
        TEXT + "\n" + PETER_SIG.replace("— ", "-- "),
        TEXT + "\n" + PETER_SIG.replace("—", "\u2013"),
        TEXT + "\n" + PETER_SIG.replace(" x08", "  x08"),
        TEXT + "\n" + PETER_SIG.replace("AM=", "AM"),
        TEXT + "\n" + PETER_SIG.replace("AM=", "AN="),  # non-canonical trailing bits
        TEXT + "\n— PeterNeumann x08gow==\n",  # the key ID alone, no signature
        TEXT + "\n— Peter+Neumann " + PETER_SIG.split(" ")[2],
        TEXT + "\n— PeterNeumann\n",
        TEXT.replace("\n", "\r\n", 1) + "\n" + PETER_SIG,
    ]
    for note in bad_notes:
        with pytest.raises(MalformedError):
            opens(note, peter())
    with pytest.raises(MalformedError):
        open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), [peter()])
    with pytest.raises(MalformedError, match="too large"):
        open_note(b"a" * (1 << 20) + (TEXT + "\n" + PETER_SIG).encode(), [peter()])


def test_open_a_misnamed_or_rehashed_signature_is_not_trusted() -> None:
    """note_test.go: name or key ID changed; here those are simply unknown keys."""
    misnamed = PETER_SIG.replace("PeterNeumann", "CarmenSandiego")
    rehashed = PETER_SIG.replace("x08g", "xxxx")
    for sig in (misnamed, rehashed):
        with pytest.raises(IntegrityError):
            opens(TEXT + "\n" + sig, peter())


def test_text_may_hold_blank_lines() -> None:
    """c2sp.org/signed-note: the last blank line separates text from signatures."""
    signer = NoteSigner("example.com/k", Ed25519PrivateKey.generate())
    text = b"first\n\nsecond\n\n"
    opened = open_note(sign_note(text, signer), [signer.verifier])
    assert opened.text == text


def test_spec_example_notes_are_well_formed() -> None:
    """c2sp.org/signed-note and tlog-checkpoint examples parse; their keys are unknown."""
    examples = [
        "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned è subito "
        "sera.\n\n— quasimodo.example/salvatore NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+E"
        "hfLW9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n",
        "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
        "\n— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URY"
        "N7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n",
    ]
    for note in examples:
        with pytest.raises(IntegrityError, match="no signature from a trusted key"):
            opens(note, peter())
