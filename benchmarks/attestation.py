"""Remote attestation: full round trip against swtpm, and verifier throughput.

Starts its own swtpm and `trustplane server` (SQLite) on 127.0.0.1, with a
policy that releases image layer keys to `node:bench` only when attested.
The node enrols (MakeCredential on the server, ActivateCredential in
swtpm), measures a registered two-layer image into PCR 13, and then, for
each round:

    GET /v1/attestation/nonce -> TPM2_Quote (swtpm) -> POST /v1/attestation/quote
    (verified, logged) -> POST /v1/unwrap (released only to the attested node)

Reported: round-trip p50/p99 (goal: p50 <= 50 ms), and the verifier's
quotes/s on one core: `verify_quote` (signature, AK attributes, nonce,
event-log replay, PCR digest) in a loop over a real swtpm quote (goal:
>= 2000/s/core). The reference tool `tpm2_checkquote` (tpm2-tools, one
process per quote, as it is used) checks the same quote in the same run;
the ratio of the two is printed. Every answer is checked once before timing.

    python benchmarks/attestation.py [--rounds 200] [--seconds 3]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk

from trustplane.agent.attester import Attester, Layer
from trustplane.agent.tpm import Tpm
from trustplane.api.images import LayerRecord
from trustplane.atomic import atomic_write
from trustplane.crypto import keywrap
from trustplane.crypto.keys import generate_key_pair, load_recipient_key, load_unwrap_key
from trustplane.crypto.layer_cipher import PrivateOptions
from trustplane.crypto.node_assertion import make_node_assertion
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.swtpm import start_swtpm
from trustplane.trust import tpm as tpm_format
from trustplane.trust.attestation import verify_quote

RULE = """\
  - subjects: ["node:bench"]
    actions: [key.release]
    resources: ["image:*"]
    require_attestation: true
"""
REPOSITORY = "bench.test/attested/app"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    checkquote = shutil.which("tpm2_checkquote")
    if checkquote is None:
        raise SystemExit("tpm2_checkquote not found; install the Debian package tpm2-tools")

    with tempfile.TemporaryDirectory(prefix="tp-bench-att-") as tmp:
        work = Path(tmp)
        with start_swtpm(work / "swtpm") as swtpm:
            plane = start_control_plane(work / "server")
            try:
                policy = plane.data_dir / "policy.yaml"
                atomic_write(policy, (policy.read_text() + RULE).encode(), mode=0o600)
                run(plane, swtpm.tcti, work, args, checkquote)
            finally:
                plane.stop()


def run(
    plane: RunningControlPlane, tcti: str, work: Path, args: argparse.Namespace, checkquote: str
) -> None:
    admin = plane.admin()
    recipient = load_recipient_key(
        admin.create_recipient("bench-images").public_key.encode(), "recipient"
    )
    layers = [Layer(i, digest(b"blob%d" % i), digest(b"diff%d" % i)) for i in range(2)]
    manifest = digest(b"manifest")
    admin.register_image(
        REPOSITORY,
        manifest,
        [
            LayerRecord(index=x.index, digest=x.blob, encrypted=True, diff_id=x.diff_id)
            for x in layers
        ],
    )
    option = PrivateOptions(os.urandom(32), os.urandom(16), layers[1].blob)
    annotation = base64.b64encode(keywrap.wrap(option.to_json(), [recipient]).encode()).decode()

    signing = ec.generate_private_key(ec.SECP256R1())
    admin.register_node("bench", "host", jwk.JWK.from_pyca(signing).export_to_pem().decode())
    node = plane.client()
    node.login_node(
        "bench",
        make_node_assertion(jwk.JWK.from_pyca(signing), "bench", plane.url + "/v1/auth/token"),
    )
    transport_private, transport_public = generate_key_pair("ec-p256")
    transport_key = load_unwrap_key(transport_private, "transport")

    with Tpm(tcti) as device:
        attester = Attester(device, work / "agent")
        attester.enroll(node, transport_public.decode())
        attester.measure(REPOSITORY, manifest, layers)

        def round_trip() -> None:
            verdict = attester.attest(node)
            if not verdict.passed:
                raise SystemExit(f"attestation failed: {verdict.reason}")
            answer = node.unwrap(annotation, transport_public.decode())
            payload = keywrap.unwrap(answer.jwe, [transport_key], "bench")
            if payload is None or PrivateOptions.from_json(payload) != option:
                raise SystemExit("the released key is not the layer's")

        for _ in range(5):
            round_trip()  # warm-up, and the check
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            round_trip()
            times.append((time.perf_counter() - start) * 1000)

        nonce = os.urandom(32)
        quote = device.quote(nonce, (attester.pcr,))
        ak_public = device.identity().ak_public
        events = list(attester.log.events)

    p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
    print(f"round trip (nonce, quote, verify, key release) over {args.rounds} rounds:")
    print(f"  p50 {p50:.1f} ms   p99 {p99:.1f} ms   mean {statistics.fmean(times):.1f} ms")
    print(f"  goal p50 <= 50 ms: {'met' if p50 <= 50 else 'NOT met'}")

    def verify() -> None:
        verify_quote(ak_public, quote.attest, quote.signature, nonce, events, (attester.pcr,))

    verify()
    rate = throughput(verify, args.seconds)
    print(f"verifier (this process, one core): {rate:,.0f} quotes/s/core")
    print(f"  goal >= 2000 quotes/s/core: {'met' if rate >= 2000 else 'NOT met'}")

    ak = tpm_format.parse_public(ak_public)
    pem = work / "ak.pem"
    pem.write_bytes(
        ak.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (work / "msg").write_bytes(quote.attest)
    (work / "sig").write_bytes(quote.signature)
    command = [checkquote, "-u", str(pem), "-m", str(work / "msg"), "-s", str(work / "sig")]
    command += ["-g", "sha256", "-q", nonce.hex()]

    def tools() -> None:
        subprocess.run(command, check=True, capture_output=True)

    tools()
    tools_rate = throughput(tools, args.seconds)
    print(f"tpm2_checkquote (one process per quote): {tools_rate:,.0f} quotes/s")
    print(f"  ratio trustplane / tpm2_checkquote: {rate / tools_rate:.1f}x")


def throughput(call: Callable[[], None], seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        call()
        count += 1
    return count / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
