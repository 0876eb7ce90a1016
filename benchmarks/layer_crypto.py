"""Layer encryption and decryption speed: trustplane against skopeo, same run.

A random layer (1 GiB by default) in an OCI layout is encrypted to another
layout and decrypted back, once by `trustplane image` and once by
`skopeo copy`, each a separate process, so both pay their own start-up and
their peak RSS is measured the same way (wait4). The bound is one core of
OpenSSL HMAC-SHA256, which ocicrypt's format makes the serial floor: every
ciphertext byte must pass one HMAC in order.

    python benchmarks/layer_crypto.py [--size-mib 1024] [--runs 3]

Prints MB/s (10^6 bytes per second), the ratio to skopeo, the share of the
bound, and peak RSS per tool.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trustplane.crypto.keys import generate_key_pair

CHUNK = 1 << 20


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_mib: float


def make_layout(root: Path, size: int) -> None:
    """An OCI layout with one gzip layer of about `size` random bytes.

    The layer is a real gzip stream of stored (level 0) blocks: skopeo sniffs
    content and would compress anything that is not already compressed, so
    only then do both tools do the same work, encryption alone.
    """
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    stream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    gzip = zlib.compressobj(0, zlib.DEFLATED, 31)
    zeros = bytes(CHUNK)
    digest, diff_id = hashlib.sha256(), hashlib.sha256()
    tmp = blobs / "layer.tmp"
    with tmp.open("wb") as out:
        for _ in range(size // CHUNK):
            chunk = stream.update(zeros)
            diff_id.update(chunk)
            for piece in (gzip.compress(chunk),):
                digest.update(piece)
                out.write(piece)
        tail = gzip.flush()
        digest.update(tail)
        out.write(tail)
    size = tmp.stat().st_size
    layer_digest = "sha256:" + digest.hexdigest()
    tmp.rename(blobs / layer_digest[7:])
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id.hexdigest()]},
        },
        separators=(",", ":"),
    ).encode()
    config_digest = _store(blobs, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": size,
                }
            ],
        },
        separators=(",", ":"),
    ).encode()
    manifest_digest = _store(blobs, manifest)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))


def _store(blobs: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest[7:]).write_bytes(data)
    return digest


def timed(argv: list[str]) -> Run:
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {stderr.strip()}")
    return Run(seconds, usage.ru_maxrss / 1024)


def hmac_bound(size: int) -> float:
    """Bytes per second of one core of OpenSSL HMAC-SHA256 (Python's hmac is OpenSSL)."""
    data = os.urandom(CHUNK)
    mac = hmac.new(os.urandom(32), digestmod="sha256")
    start = time.perf_counter()
    for _ in range(size // CHUNK):
        mac.update(data)
    return size / (time.perf_counter() - start)


def in_process(operation: str, source: Path, target: Path, key: Path) -> float:
    """Seconds for the same operation through the library, without the
    interpreter's start-up: what the engine itself does."""
    from trustplane.crypto.keys import load_unwrap_key
    from trustplane.images.decrypt import DecryptRequest, decrypt_image
    from trustplane.images.encrypt import EncryptRequest, encrypt_image
    from trustplane.images.recipients import parse_recipient
    from trustplane.oci import reference

    src, dst = reference.parse(f"oci:{source}:v1"), reference.parse(f"oci:{target}:v1")
    start = time.perf_counter()
    if operation == "encrypt":
        encrypt_image(EncryptRequest(src, dst, [parse_recipient(f"jwe:{key}")]))
    else:
        decrypt_image(DecryptRequest(src, dst, [load_unwrap_key(key.read_bytes(), str(key))]))
    return time.perf_counter() - start


def best(runs: list[Run]) -> Run:
    return Run(min(r.seconds for r in runs), max(r.peak_rss_mib for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3, help="best of N for each measurement")
    args = parser.parse_args()
    size = args.size_mib * CHUNK
    trustplane = [sys.executable, "-m", "trustplane", "image"]
    skopeo = ["skopeo", "--insecure-policy", "copy", "--quiet"]

    work = Path(tempfile.mkdtemp(prefix="trustplane-bench-"))
    try:
        private, public = work / "key.pem", work / "key.pub"
        private_pem, public_pem = generate_key_pair("ec-p256")
        private.write_bytes(private_pem)
        public.write_bytes(public_pem)
        src = work / "src"
        make_layout(src, size)

        results: dict[str, Run] = {}
        plans = {
            "trustplane encrypt": lambda out: [
                *trustplane,
                "encrypt",
                "--quiet",
                f"oci:{src}:v1",
                f"oci:{out}:v1",
                "--recipient",
                f"jwe:{public}",
            ],
            "skopeo encrypt": lambda out: [
                *skopeo,
                "--encryption-key",
                f"jwe:{public}",
                f"oci:{src}:v1",
                f"oci:{out}:v1",
            ],
        }
        for name, argv in plans.items():
            runs = []
            for _ in range(args.runs):
                shutil.rmtree(work / "encrypted", ignore_errors=True)
                runs.append(timed(argv(work / "encrypted")))
            results[name] = best(runs)
        # Both tools decrypt the same image, the one trustplane made.
        encrypted = work / "encrypted"
        shutil.rmtree(encrypted)
        timed(plans["trustplane encrypt"](encrypted))
        plans = {
            "trustplane decrypt": lambda out: [
                *trustplane,
                "decrypt",
                "--quiet",
                f"oci:{encrypted}:v1",
                f"oci:{out}:v1",
                "--key",
                str(private),
            ],
            "skopeo decrypt": lambda out: [
                *skopeo,
                "--decryption-key",
                str(private),
                f"oci:{encrypted}:v1",
                f"oci:{out}:v1",
            ],
        }
        decrypted = work / "decrypted"
        for name, argv in plans.items():
            runs = []
            for _ in range(args.runs):
                shutil.rmtree(decrypted, ignore_errors=True)
                runs.append(timed(argv(decrypted)))
            results[name] = best(runs)
        engine = {}
        for operation, source, key in (("encrypt", src, public), ("decrypt", encrypted, private)):
            times = []
            for _ in range(args.runs):
                shutil.rmtree(work / "engine-out", ignore_errors=True)
                times.append(in_process(operation, source, work / "engine-out", key))
            engine[operation] = min(times)
        bound = hmac_bound(size)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"layer size: {args.size_mib} MiB, best of {args.runs}, OCI layout to OCI layout")
    print(f"bound (1 core OpenSSL HMAC-SHA256): {bound / 1e6:8.0f} MB/s")
    for operation in ("encrypt", "decrypt"):
        ours, theirs = results[f"trustplane {operation}"], results[f"skopeo {operation}"]
        ours_rate, theirs_rate = size / ours.seconds, size / theirs.seconds
        print(
            f"{operation}: trustplane {ours_rate / 1e6:6.0f} MB/s "
            f"(peak RSS {ours.peak_rss_mib:4.0f} MiB)"
            f" | skopeo {theirs_rate / 1e6:6.0f} MB/s (peak RSS {theirs.peak_rss_mib:4.0f} MiB)"
            f" | ratio {ours_rate / theirs_rate:4.1f}x | {100 * ours_rate / bound:3.0f}% of bound"
        )
    for operation, seconds in engine.items():
        rate = size / seconds
        print(
            f"{operation}, in-process (no interpreter start-up): {rate / 1e6:6.0f} MB/s"
            f" | {100 * rate / bound:3.0f}% of bound"
        )


if __name__ == "__main__":
    main()
