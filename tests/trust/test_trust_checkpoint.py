"""C2SP tlog-checkpoint notes: real sum.golang.org checkpoints, strict parsing, fail closed."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustplane.errors import IntegrityError, MalformedError
from trustplane.trust.checkpoint import (
    Checkpoint,
    NoteSigner,
    open_checkpoint,
    parse_verifier_key,
    sign_checkpoint,
)
from trustplane.trust.merkle import EMPTY_ROOT, leaf_hash
from trustplane.trust.note import open_note, sign_note

# transparency-dev/formats, log/note_test.go TestSumDBNoteParsing and
# BenchmarkParse: a checkpoint signed by sum.golang.org, and three witness
# cosignatures over it ("random1"/"random2" reuse a signature under unknown names).
SUMDB_KEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_ORIGIN = "go.sum database tree"
SUMDB_NOTE = (
    "go.sum database tree\n"
    "6476701\n"
    "mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=\n"
    "\n"
    "— sum.golang.org Az3grsLX85Gz+s1SiTbgkuqxgItqFq7gsMUEyVnrsa9LM7Us9S+1xbFIGu95949rj4nPRYfv"
    "imWEPWL+o3GeoWwOoAw=\n"
)
WITNESS_KEYS = [
    "monkeys+db4d9f7e+AULaJMvTtDLHPUcUrjdDad9vDlh/PTfC2VV60JUtCfWT",
    "bananas+cf639f13+AaPjhFnPCQnid/Ql32KWhmh+uk72FVRfK+2DLmO3BI3M",
    "witness+f13a86db+AdYV1Ztajd9BvyjP2HgpwrqYL6TjOwIjGMOq8Bu42xbN",
]
WITNESS_SIGS = [
    "— monkeys 202ffh9ve46Mqbhuyb4wnC2Pwdan5EsXQym/tF1ggXJqhjGosU4T5intH4iKMRgDLxrnXuIjRaU2Nbv"
    "AnaepM6Y+8ww=\n",
    "— bananas z2OfE+2bbsBZ7NLgfuslc0v7NFW2QyexJ7fhePpoL2N/P7N/COd5S+JNHbQEAlYzz2C5sg0E+x/MggS1"
    "mDR6t3/9rQw=\n",
    "— witness 8TqG25yWGFLdT7WPf/WoyeG3LwqtkXP+8S3yykOVm6EMh4hPgCke6eSVPU4BdtXNMPJBXKF+UpDbGgCd"
    "cpR8SVSoqAU=\n",
    "— random1 8TqG25yWGFLdT7WPf/WoyeG3LwqtkXP+8S3yykOVm6EMh4hPgCke6eSVPU4BdtXNMPJBXKF+UpDbGgCd"
    "cpR8SVSoqAU=\n",
    "— random2 8TqG25yWGFLdT7WPf/WoyeG3LwqtkXP+8S3yykOVm6EMh4hPgCke6eSVPU4BdtXNMPJBXKF+UpDbGgCd"
    "cpR8SVSoqAU=\n",
]


def sumdb() -> Checkpoint:
    return open_checkpoint(SUMDB_NOTE.encode(), parse_verifier_key(SUMDB_KEY), SUMDB_ORIGIN)


def test_real_sumdb_checkpoint_opens() -> None:
    checkpoint = sumdb()
    assert checkpoint.origin == SUMDB_ORIGIN
    assert checkpoint.size == 6476701
    assert checkpoint.root == base64.b64decode("mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=")
    assert checkpoint.extensions == ()
    assert checkpoint.body() == SUMDB_NOTE.split("\n\n")[0].encode() + b"\n"


def test_witness_cosignatures_are_ignored_or_verified() -> None:
    note = (SUMDB_NOTE + "".join(WITNESS_SIGS)).encode()
    log_key = parse_verifier_key(SUMDB_KEY)
    assert open_checkpoint(note, log_key, SUMDB_ORIGIN) == sumdb()
    witnesses = [parse_verifier_key(k) for k in WITNESS_KEYS]
    opened = open_note(note, [log_key, *witnesses])
    assert [v.name for v in opened.signed_by] == [
        "sum.golang.org",
        "monkeys",
        "bananas",
        "witness",
    ]


def test_wrong_origin_is_an_integrity_error() -> None:
    """log/note_test.go: 'Go rocks but I might have the wrong ID'."""
    with pytest.raises(IntegrityError, match="not the expected"):
        open_checkpoint(
            SUMDB_NOTE.encode(),
            parse_verifier_key(SUMDB_KEY),
            "Go rocks but I might have the wrong ID",
        )


def test_missing_or_bad_log_signature_is_an_integrity_error() -> None:
    log_key = parse_verifier_key(SUMDB_KEY)
    witnesses_only = SUMDB_NOTE.split("— ")[0] + "".join(WITNESS_SIGS)
    with pytest.raises(IntegrityError):
        open_checkpoint(witnesses_only.encode(), log_key, SUMDB_ORIGIN)
    tampered = SUMDB_NOTE.replace("6476701", "6476702")
    with pytest.raises(IntegrityError):
        open_checkpoint(tampered.encode(), log_key, SUMDB_ORIGIN)
    other = NoteSigner("sum.golang.org", Ed25519PrivateKey.generate())
    with pytest.raises(IntegrityError):
        open_checkpoint(sign_checkpoint(sumdb(), other), log_key, SUMDB_ORIGIN)


def test_sign_and_open_round_trip_with_extensions() -> None:
    signer = NoteSigner("trustplane.example/log", Ed25519PrivateKey.generate())
    verifier = parse_verifier_key(signer.verifier_key())
    checkpoint = Checkpoint("trustplane.example/log", 42, leaf_hash(b"x"), ("ext one", "2"))
    note = sign_checkpoint(checkpoint, signer)
    assert note.startswith(
        b"trustplane.example/log\n42\n" + base64.b64encode(checkpoint.root) + b"\next one\n2\n\n"
    )
    assert open_checkpoint(note, verifier, "trustplane.example/log") == checkpoint
    empty = Checkpoint("trustplane.example/log", 0, EMPTY_ROOT)
    assert open_checkpoint(sign_checkpoint(empty, signer), verifier, empty.origin) == empty


def test_spec_example_body_round_trips() -> None:
    """c2sp.org/tlog-checkpoint example body."""
    body = b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    checkpoint = Checkpoint.parse(body)
    assert (checkpoint.origin, checkpoint.size) == ("example.com/behind-the-sofa", 20852163)
    assert checkpoint.body() == body


ROOT_B64 = base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize(
    "body",
    [
        # transparency-dev/formats log/checkpoint_test.go invalid cases
        "Head\n9944\n",
        "\n9944\n" + ROOT_B64 + "\n",
        "Log\n123\n" + ROOT_B64,
        "Log\nbananas\n" + ROOT_B64 + "\n",
        "Log\n-34\n" + ROOT_B64 + "\n",
        "Log\n3438945738945739845734895735\n" + ROOT_B64 + "\n",
        "Log\n123\nThisIsn'tBase64\n",
        # accepted there, refused here: blank extension lines (the spec: non-empty)
        "Log\n9944\n" + ROOT_B64 + "\n\n\n\n",
        "Log\n9944\n" + ROOT_B64 + "\nok\n\n",
        # strict size and root
        "Log\n0123\n" + ROOT_B64 + "\n",
        "Log\n+123\n" + ROOT_B64 + "\n",
        "Log\n 123\n" + ROOT_B64 + "\n",
        "Log\n１２３\n" + ROOT_B64 + "\n",  # full-width digits, which int() would take
        "Log\n18446744073709551616\n" + ROOT_B64 + "\n",
        "Log\n" + "9" * 5000 + "\n" + ROOT_B64 + "\n",
        "Log\n123\n" + base64.b64encode(bytes(31)).decode() + "\n",
        "Log\n123\nYmFuYW5hcw==\n",  # log/checkpoint_test.go's 7-byte "bananas" root
        "Log\n123\n" + ROOT_B64.rstrip("=") + "\n",
        "Log\n123\n" + ROOT_B64[:-2] + "9=\n",  # non-canonical trailing bits
        "Log\r\n123\n" + ROOT_B64 + "\n",
        "Log\n123\n" + ROOT_B64 + "\nbad\x7f\x01\n",
    ],
)
def test_malformed_bodies_are_refused(body: str) -> None:
    with pytest.raises(MalformedError):
        Checkpoint.parse(body.encode())


def test_a_signed_malformed_body_is_malformed_an_unsigned_one_untrusted() -> None:
    """The signature is checked before the body is read (the note spec's MUST)."""
    signer = NoteSigner("log", Ed25519PrivateKey.generate())
    note = sign_note(b"log\n0123\n" + ROOT_B64.encode() + b"\n", signer)
    with pytest.raises(MalformedError):
        open_checkpoint(note, signer.verifier, "log")
    stranger = NoteSigner("log", Ed25519PrivateKey.generate())
    with pytest.raises(IntegrityError):
        open_checkpoint(note, stranger.verifier, "log")


def test_size_limits_are_inclusive() -> None:
    top = (1 << 64) - 1
    body = f"Log\n{top}\n{ROOT_B64}\n".encode()
    assert Checkpoint.parse(body).size == top
    assert Checkpoint.parse(f"Log\n0\n{ROOT_B64}\n".encode()).size == 0


def test_invalid_checkpoints_cannot_be_built() -> None:
    root = bytes(32)
    for args in [
        ("", 1, root),
        ("a\nb", 1, root),
        ("log", -1, root),
        ("log", 1 << 64, root),
        ("log", 1, bytes(31)),
        ("lo\ud800g", 1, root),
        ("lo\x00g", 1, root),
    ]:
        with pytest.raises(MalformedError):
            Checkpoint(*args)
    with pytest.raises(MalformedError):
        Checkpoint("log", 1, root, ("",))
