"""Encrypted volumes: sequential I/O against plain on the same backend, create and open.

Starts its own tgtd and one-node Ceph cluster on 127.0.0.1 (temporary
directory), then for each backend (file, iSCSI, RBD) creates a plain volume
and encrypted ones with trustplane's drivers and measures, through QEMU's
block layer (`qemu-io`, 4 MiB requests, sequential, the figure qemu-io
itself times, so process start and open are left out):

- raw (plain volume);
- QEMU LUKS1, aes-256-xts-plain64 (the default: what a VM's QEMU runs);
- QEMU LUKS1 cipher variants, to see what QEMU's crypto backend
  accelerates: aes-128-xts, and aes-256-cbc-essiv (not a candidate for
  new volumes: CBC writes are serial and ESSIV is the older scheme);
- RBD: librbd's own encryption, LUKS2 (4096-byte sectors) and LUKS1.

Bounds: the single-core AES-256-XTS rate (`openssl speed -evp aes-256-xts`,
one process) and the XTS rate of the library QEMU's cipher code calls
(Debian's QEMU 7.2 uses nettle: `nettle_xts_encrypt_message` over 4 MiB,
called through ctypes). Times: `create_volume` per engine, and the open of
an encrypted volume (qemu-io open with the key, minus the same for raw; and
the user-space open: qemu-storage-daemon FUSE export + loop device ready).

Hot-plug attach to a running VM including the KMS round trip: a control
plane (its own, with a file backend) creates a volume; a compute node,
logged in with its key, runs `trustplane volume attach --live`'s code
(agent/volume_attach.py) against a TCG guest under its own libvirtd, N
times: the key release over HTTPS (policy, log commit), the header check,
the ephemeral libvirt secret, QEMU's `blockdev-add` of the LUKS volume.
p50 and p90 of the whole attach, of the key release alone, and of detach.

Containers (`--container-runs`, 0 skips): `docker run` with a trustplane
volume against a `local` one, the added start time (p50) and sequential
throughput inside the container, with ratios: benchmarks/volume_plugin.py's
`measure`, run as a section here.

Re-encryption (the data key rotated, `volume reencrypt`): a QEMU LUKS1
volume copied under a new key into new LUKS1 storage by trustplane's copier
(volumes/reencryption.py: two qemu-storage-daemon FUSE exports, 4 MiB
chunks, each flushed before the next), in a forked process whose peak RSS
is reported (before and after the copy: memory stays flat); against
`qemu-img convert` between the same two LUKS volumes (old key → new key)
in the same run, and the single-core AES-256-XTS decrypt+encrypt bound
(cryptography's OpenSSL, 1 MiB data units). `--only-rotate` runs just this.

One run, ratios reported; no thresholds. The machine may be shared: the
figures of one run are comparable with each other, not across runs.

File volumes and LUN backing files go to tmpfs by default (`--file-dir`):
on a shared disk, the raw side measures other processes' writeback.
Each path runs `--repeat` rounds in turn and keeps its best.

    python benchmarks/volumes.py [--size-mib 256] [--opens 10] [--repeat 2] [--attaches 10]
                                 [--rotate-mib 128] [--only-rotate]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from trustplane.api.volume_location import AnyLocation, Endpoint, FileLocation
from trustplane.api.volume_spec import (
    BackendKind,
    ControlLocation,
    EncryptionSpec,
    Engine,
    Provider,
    VolumeTypeSpec,
    default_encryption,
)
from trustplane.embedded.ceph import start_ceph
from trustplane.embedded.tgtd import start_tgtd
from trustplane.tools import QEMU_PBKDF_CALIBRATION, Executor, SecretFile
from trustplane.tools.command import Arg
from trustplane.volumes.access import QemuNode, qemu_node
from trustplane.volumes.attachers.userspace import KEY_OBJECT, key_object
from trustplane.volumes.backends import Backend, FileBackend, IscsiBackend, RbdBackend
from trustplane.volumes.encryptors import encryptor_for
from trustplane.volumes.encryptors.base import passphrase
from trustplane.volumes.reencryption import DEFAULT_CHUNK
from trustplane.volumes.reencryption import copy as reencrypt_copy
from trustplane.volumes.volume import create_volume

MIB = 1 << 20
REQUEST = 4 * MIB
EXECUTOR = Executor(timeout=1800)
# qemu-io: "256 MiB, 64 ops; 00.50 sec (512.000 MiB/sec and 128.0000 ops/sec)"
_RATE = re.compile(r"\(([\d.]+) (bytes|KiB|MiB|GiB)/sec and")
_SCALE = {"bytes": 1 / MIB, "KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}
DEFAULT = "QEMU LUKS1 aes-256-xts"
VARIANTS = (
    ("QEMU LUKS1 aes-128-xts", "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain64"),
    (
        "QEMU LUKS1 aes-256-cbc-essiv",
        "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    ),
)
CANDIDATES = ("QEMU LUKS1 aes-256-xts", "QEMU LUKS1 aes-128-xts", "librbd")
"""Encrypted paths fit for new volumes (CBC-ESSIV is measured, not offered)."""
_OPENSSL = re.compile(r"^aes-256-xts\s+.*?([\d.]+)k\s*$", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class IoPath:
    """One way to reach a volume's plaintext through QEMU."""

    label: str
    image_opts: str
    objects: tuple[SecretFile, ...]


def _objects(objects: tuple[SecretFile, ...]) -> list[Arg]:
    args: list[Arg] = []
    for secret in objects:
        args += ["--object", secret]
    return args


def qemu_io_rate(path: IoPath, operation: str, size: int) -> float:
    """MiB/s of sequential `operation` (write/read) in 4 MiB requests, as qemu-io times it."""
    commands: list[Arg] = []
    for offset in range(0, size, REQUEST):
        verb = "write -P 0x5a" if operation == "write" else "read"
        commands += ["-c", f"{verb} {offset} {REQUEST}"]
    # Write-back: writes land in the host's page cache (or librbd's and tgtd's),
    # so both sides measure the block layer and the cipher, not a disk's flushes.
    argv: list[Arg] = [
        "qemu-io", "-t", "writeback", *_objects(path.objects), "--image-opts", path.image_opts,
        *commands,
    ]  # fmt: skip
    out = EXECUTOR.run(argv).text
    assert " failed: " not in out, out[-500:]
    seconds = sum(4 / (float(m.group(1)) * _SCALE[m.group(2)]) for m in _RATE.finditer(out))
    return (size / MIB) / seconds


def qemu_io_open_seconds(path: IoPath, rounds: int) -> float:
    """Median wall time of `qemu-io -c 'read 0 512'` (process, open, one read)."""
    argv: list[Arg] = [
        "qemu-io", "-r", *_objects(path.objects), "--image-opts", path.image_opts,
        "-c", "read 0 512",
    ]  # fmt: skip
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        EXECUTOR.run(argv)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def openssl_xts_bound() -> float:
    """Single-core AES-256-XTS in MB/s (OpenSSL, 16 KiB blocks, one process)."""
    out = EXECUTOR.run(
        ["openssl", "speed", "-seconds", "3", "-bytes", "16384", "-evp", "aes-256-xts"]
    ).text
    found = _OPENSSL.search(out)
    if found is None:
        raise SystemExit(f"openssl speed printed no aes-256-xts rate:\n{out}")
    return float(found.group(1)) * 1000 / 1e6


def nettle_xts_rate() -> float | None:
    """MB/s of nettle's AES-256-XTS over 4 MiB in one call (QEMU 7.2's cipher backend)."""
    name = ctypes.util.find_library("nettle")
    if name is None:
        return None
    nettle = ctypes.CDLL(name)
    context = ctypes.create_string_buffer(512)
    tweak = ctypes.create_string_buffer(512)
    nettle.nettle_aes256_set_encrypt_key(context, os.urandom(32))
    nettle.nettle_aes256_set_encrypt_key(tweak, os.urandom(32))
    size = 64 * MIB
    source = ctypes.create_string_buffer(size)
    target = ctypes.create_string_buffer(size)
    iv = ctypes.create_string_buffer(16)
    started = time.process_time()
    for offset in range(0, size, REQUEST):
        nettle.nettle_xts_encrypt_message(
            context, tweak, nettle.nettle_aes256_encrypt, iv, REQUEST,
            ctypes.byref(target, offset), ctypes.byref(source, offset),
        )  # fmt: skip
    return size / (time.process_time() - started) / 1e6


def gnutls_xts_rate() -> float | None:
    """MB/s of GnuTLS's AES-256-XTS over 4 MiB a call (CPU time).

    What QEMU's cipher code would call if it were built with GnuTLS as its
    crypto backend instead of nettle (and what nbdkit's luks filter calls).
    """
    name = ctypes.util.find_library("gnutls")
    if name is None:
        return None
    gnutls = ctypes.CDLL(name)
    gnutls.gnutls_cipher_get_id.argtypes = [ctypes.c_char_p]
    algorithm = gnutls.gnutls_cipher_get_id(b"AES-256-XTS")

    class Datum(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_uint)]

    key = ctypes.create_string_buffer(os.urandom(64), 64)
    iv = ctypes.create_string_buffer(16)
    handle = ctypes.c_void_p()
    status = gnutls.gnutls_cipher_init(
        ctypes.byref(handle), algorithm,
        ctypes.byref(Datum(ctypes.cast(key, ctypes.c_void_p), 64)),
        ctypes.byref(Datum(ctypes.cast(iv, ctypes.c_void_p), 16)),
    )  # fmt: skip
    if status != 0:
        return None
    source = ctypes.create_string_buffer(REQUEST)
    target = ctypes.create_string_buffer(REQUEST)
    rounds = 16
    started = time.process_time()
    for _ in range(rounds):
        gnutls.gnutls_cipher_set_iv(handle, iv, 16)
        gnutls.gnutls_cipher_encrypt2(handle, source, REQUEST, target, REQUEST)
    seconds = time.process_time() - started
    gnutls.gnutls_cipher_deinit(handle)
    return rounds * REQUEST / seconds / 1e6


def luks_path(label: str, node: QemuNode, key: bytes) -> IoPath:
    return IoPath(
        label,
        f"driver=luks,key-secret={KEY_OBJECT},{node.opts('file.')}",
        (key_object(passphrase(key)), *node.objects),
    )


def raw_path(node: QemuNode) -> IoPath:
    return IoPath("raw", f"driver=raw,{node.opts('file.')}", node.objects)


def librbd_path(label: str, node: QemuNode, key: bytes, luks: str) -> IoPath:
    return IoPath(
        label,
        f"{node.opts()},encrypt.format={luks},encrypt.key-secret={KEY_OBJECT}",
        (key_object(passphrase(key)), *node.objects),
    )


def qemu_variant(backend: Backend, name: str, size: int, key: bytes, options: str) -> AnyLocation:
    """A QEMU LUKS1 volume with cipher `options` other than the spec's (benchmark only)."""
    header = 4 << 20  # room enough for any variant's header
    argv_options = f"key-secret={KEY_OBJECT},iter-time=10,{options}"
    if backend.qemu_creates_storage:
        location = backend.location(name)
        target = backend.qemu_create_target(location)
        retry = QEMU_PBKDF_CALIBRATION.with_cleanup(lambda: backend.remove_leftover(location))
        payload = size
    else:
        location = backend.create(name, size + header)
        target = backend.qemu_format_target(location)
        retry = QEMU_PBKDF_CALIBRATION
        payload = size
    EXECUTOR.run(
        ["qemu-img", "create", "-q", "-f", "luks", "--object", key_object(passphrase(key)),
         "-o", argv_options, target, str(payload)],
        retry=retry,
    )  # fmt: skip
    return location


@contextmanager
def volumes_of(backend: Backend) -> Iterator[list[AnyLocation]]:
    made: list[AnyLocation] = []
    try:
        yield made
    finally:
        for location in made:
            backend.delete(location)


def bench_backend(
    kind: BackendKind, backend: Backend, size: int, opens: int, repeat: int, report: list[str]
) -> dict[str, float]:
    key = secrets.token_bytes(32)
    rates: dict[str, float] = {}
    with volumes_of(backend) as made:
        plain_type = VolumeTypeSpec(backend=kind, encryption=None)
        plain = create_volume(backend, plain_type, "plain", size, None)
        made.append(plain.location)
        started = time.perf_counter()
        qemu_type = VolumeTypeSpec(backend=kind, encryption=EncryptionSpec())
        created = create_volume(backend, qemu_type, "luks", size, key)
        create_s = time.perf_counter() - started
        assert created.engine is not None
        luks_location = created.location
        made.append(luks_location)
        credentials = backend.credentials()
        paths = [
            raw_path(qemu_node(plain.location, credentials)),
            luks_path(DEFAULT, qemu_node(luks_location, credentials), key),
        ]
        for label, options in VARIANTS:
            name = "v" + secrets.token_hex(3)
            location = qemu_variant(backend, name, size, key, options)
            made.append(location)
            paths.append(luks_path(label, qemu_node(location, credentials), key))
        librbd_create_s = None
        if kind is BackendKind.RBD:
            for provider, luks in ((Provider.LUKS2, "luks2"), (Provider.LUKS, "luks")):
                spec = EncryptionSpec(provider=provider, control_location=ControlLocation.BACK_END)
                volume_type = VolumeTypeSpec(backend=kind, encryption=spec)
                started = time.perf_counter()
                made_volume = create_volume(backend, volume_type, f"librbd-{luks}", size, key)
                if provider is Provider.LUKS2:
                    librbd_create_s = time.perf_counter() - started
                location = made_volume.location
                made.append(location)
                label = (
                    f"librbd {luks.upper()} ({'4096' if luks == 'luks2' else '512'}-byte sectors)"
                )
                paths.append(librbd_path(label, qemu_node(location, credentials), key, luks))
        # The paths take turns, `repeat` rounds, best of each: a shared machine's
        # load then weighs on every path alike.
        for _ in range(repeat):
            for path in paths:
                for operation in ("write", "read"):
                    rate = qemu_io_rate(path, operation, size)
                    label = f"{path.label} {operation}"
                    rates[label] = max(rates.get(label, 0.0), rate)
        raw_open = qemu_io_open_seconds(paths[0], opens)
        luks_open = qemu_io_open_seconds(paths[1], opens)
        encryptor = encryptor_for(created.engine)
        userspace = []
        for _ in range(opens):
            started = time.perf_counter()
            opened = encryptor.open(luks_location, key, credentials)
            userspace.append(time.perf_counter() - started)
            opened.close()
        report.append(
            f"\n## {kind} ({size // MIB} MiB, 4 MiB sequential requests, qemu-io, best of {repeat})"
        )
        raw_w, raw_r = rates["raw write"], rates["raw read"]
        for path in paths:
            w, r = rates[f"{path.label} write"], rates[f"{path.label} read"]
            report.append(
                f"  {path.label:40s} write {w:8.0f} MiB/s ({w / raw_w:4.2f}x raw)"
                f"   read {r:8.0f} MiB/s ({r / raw_r:4.2f}x raw)"
            )
        report.append(f"  create (QEMU LUKS1, create_volume):      {create_s:6.2f} s")
        if librbd_create_s is not None:
            report.append(f"  create (librbd LUKS2, create_volume):    {librbd_create_s:6.2f} s")
        report.append(
            f"  open: qemu-io LUKS {luks_open * 1000:6.0f} ms vs raw {raw_open * 1000:6.0f} ms"
            f" (LUKS open adds {(luks_open - raw_open) * 1000:5.0f} ms);"
            f" user-space open (FUSE + loop) p50 {statistics.median(userspace) * 1000:5.0f} ms"
        )
        if kind is BackendKind.RBD:
            libopen = qemu_io_open_seconds(
                next(p for p in paths if p.label.startswith("librbd LUKS2")), opens
            )
            report.append(f"  open: qemu-io librbd LUKS2 {libopen * 1000:6.0f} ms")
    return rates


def bench_attach(work: Path, volumes_dir: Path, attaches: int, report: list[str]) -> None:
    """Hot-plug attach with the KMS round trip, as `trustplane volume attach --live` runs it."""
    import libvirt
    import yaml

    from trustplane.agent.volume_attach import attach_volume, detach_volume
    from trustplane.atomic import atomic_write
    from trustplane.crypto.keys import generate_key_pair
    from trustplane.crypto.node_assertion import load_node_key
    from trustplane.embedded.control_plane import start_control_plane
    from trustplane.embedded.guest_kernel import guest_kernel
    from trustplane.embedded.libvirtd import start_libvirtd
    from trustplane.embedded.volume_guest import ScannerGuest, build_scanner_initrd
    from trustplane.volumes.attachers.libvirt import LibvirtAttacher
    from trustplane.volumes.transport_key import NodeTransport

    data = work / "control" / "data"
    data.mkdir(parents=True, mode=0o700)
    backends = {"files": {"kind": "file", "directory": str(volumes_dir)}}
    (data / "server.yaml").write_text(yaml.safe_dump({"volume_backends": backends}))
    kernel = guest_kernel()
    initrd = build_scanner_initrd(work / "initrd.img", kernel)
    node, node_key = "bench-compute", work / "node.pem"
    with ExitStack() as stack:
        control = start_control_plane(work / "control", data_dir=data)
        stack.callback(control.stop)
        libvirtd = stack.enter_context(start_libvirtd(work / "libvirtd"))
        admin = stack.enter_context(control.admin())
        admin.create_volume_type("files", "files")
        private, public = generate_key_pair("ec-p256")
        atomic_write(node_key, private, mode=0o600)
        admin.register_node(node, "host", public.decode())
        policy = data / "policy.yaml"
        policy.write_text(
            policy.read_text()
            + f'  - subjects: ["node:{node}"]\n    actions: [volume.attach]\n'
            + '    resources: ["volume:*"]\n'
        )
        admin.create_volume("bench-attach", 64 * MIB, "files")
        conn = libvirt.open(libvirtd.uri)
        guest = ScannerGuest.define(conn, work, kernel, initrd)
        attacher = LibvirtAttacher(libvirtd.uri)
        attach_s, release_s, detach_s = [], [], []
        try:
            guest.start()
            with control.client() as client:
                client.login_as_node(node, load_node_key(node_key.read_bytes(), str(node_key)))
                transport = NodeTransport.ephemeral()  # a node's key comes wrapped to it
                for _ in range(attaches):
                    started = time.perf_counter()
                    client.attach_volume("bench-attach", "kms-probe", transport.public_pem)
                    release_s.append(time.perf_counter() - started)
                    client.detach_volume("bench-attach", "kms-probe")
                    started = time.perf_counter()
                    attach_volume(client, attacher, "bench-attach", guest.name, live=True)
                    attach_s.append(time.perf_counter() - started)
                    guest.disk_data("bench-attach")  # the guest saw it: QEMU opened it
                    started = time.perf_counter()
                    detach_volume(client, attacher, "bench-attach", guest.name)
                    detach_s.append(time.perf_counter() - started)
                    guest.wait_gone("bench-attach")
                    guest.console.write_bytes(b"")  # the next DISK line is the next attach's
        finally:
            guest.remove()
            conn.close()

    def quantiles(values: list[float]) -> str:
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
        return f"p50 {statistics.median(ordered) * 1000:6.0f} ms, p90 {p90 * 1000:6.0f} ms"

    report.append(
        f"\n## Hot-plug attach to a running VM, KMS round trip included ({attaches} runs)"
    )
    report.append(
        f"  attach (release + header check + secret + blockdev-add): {quantiles(attach_s)}"
    )
    report.append(
        f"  key release alone (HTTPS, policy, log commit):           {quantiles(release_s)}"
    )
    report.append(
        f"  detach (guest lets go, secret undefined, record cleared): {quantiles(detach_s)}"
    )
    report.append(
        f"  goal: attach p50 <= 1 s: {'met' if statistics.median(attach_s) <= 1.0 else 'NOT met'}"
    )


def xts_reencrypt_bound(seconds: float = 2.0) -> float:
    """MB/s of AES-256-XTS decrypt then encrypt of the same bytes on one core
    (cryptography, OpenSSL underneath; 1 MiB data units): what re-encryption can reach."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    old, new = secrets.token_bytes(64), secrets.token_bytes(64)
    data = secrets.token_bytes(MIB)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        tweak = done.to_bytes(16, "little")
        plain = Cipher(algorithms.AES(old), modes.XTS(tweak)).decryptor().update(data)
        Cipher(algorithms.AES(new), modes.XTS(tweak)).encryptor().update(plain)
        done += MIB
    return done / (time.perf_counter() - started) / 1e6


def _rss_mib() -> float:
    """This process's peak RSS so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _copier_child(
    backend: FileBackend,
    locations: tuple[AnyLocation, AnyLocation],
    keys: tuple[bytes, bytes],
    size: int,
    answer: multiprocessing.connection.Connection,
) -> None:
    """The copy, timed, in a process of its own (its peak RSS is the copier's)."""
    before = _rss_mib()
    started = time.perf_counter()
    reencrypt_copy(
        backend, Engine.QEMU, locations[0], keys[0], locations[1], keys[1],
        start=0, total=size, flushed=lambda _: None,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    answer.send((seconds, before, _rss_mib()))


def bench_rotation(directory: Path, size_mib: int, repeat: int, report: list[str]) -> None:
    """The re-encryption section: trustplane's copier against qemu-img convert."""
    size = size_mib * MIB
    backend = FileBackend(directory)
    spec = VolumeTypeSpec(backend=BackendKind.FILE, encryption=EncryptionSpec())
    old_key, new_key = secrets.token_bytes(32), secrets.token_bytes(32)
    old = create_volume(backend, spec, "rot-old", size, old_key).location
    assert isinstance(old, FileLocation)
    fill = [f"write -P 0x{(i * 37 + 11) % 256:02x} {i}M 1M" for i in range(size_mib)]
    old_path = luks_path("old", qemu_node(old, None), old_key)
    argv: list[Arg] = ["qemu-io", *_objects(old_path.objects), "--image-opts", old_path.image_opts]
    for command in fill:
        argv += ["-c", command]
    EXECUTOR.run(argv)
    ours: list[float] = []
    convert: list[float] = []
    peaks: list[tuple[float, float]] = []
    fork = multiprocessing.get_context("fork")
    for round_ in range(repeat):
        target = create_volume(backend, spec, f"rot-new{round_}", size, new_key).location
        receive, send = fork.Pipe(duplex=False)
        child = fork.Process(
            target=_copier_child, args=(backend, (old, target), (old_key, new_key), size, send)
        )
        child.start()
        seconds, before, peak = receive.recv()
        child.join()
        ours.append(size / seconds / 1e6)
        peaks.append((before, peak))
        backend.delete(target)
        target = create_volume(backend, spec, f"rot-ref{round_}", size, new_key).location
        assert isinstance(target, FileLocation)
        started = time.perf_counter()
        EXECUTOR.run(
            ["qemu-img", "convert", "-n",
             "--object", key_object(passphrase(old_key)),
             "--object", SecretFile(passphrase(new_key), "secret,id=key1,file={}"),
             "--image-opts", f"driver=luks,key-secret={KEY_OBJECT},file.filename={old.path}",
             "--target-image-opts", f"driver=luks,key-secret=key1,file.filename={target.path}"],
        )  # fmt: skip
        convert.append(size / (time.perf_counter() - started) / 1e6)
        backend.delete(target)
    backend.delete(old)
    bound = xts_reencrypt_bound()
    best, reference = max(ours), max(convert)
    before, peak = min(peaks, key=lambda p: p[1])
    report.append(
        f"\n## Re-encryption (volume reencrypt): {size_mib} MiB, QEMU LUKS1 aes-256-xts, old key"
        f" -> new key, files in {directory.parent}, best of {repeat}"
    )
    report.append(
        f"  trustplane copier (2 qemu-storage-daemon FUSE exports, {DEFAULT_CHUNK // MIB} MiB"
        f" chunks, fsync each): {best:7.0f} MB/s"
    )
    report.append(
        f"  qemu-img convert (same two LUKS volumes):                         {reference:7.0f}"
        f" MB/s; copier = {best / reference:.2f}x convert"
    )
    report.append(
        f"  AES-256-XTS decrypt+encrypt bound, one core (cryptography/OpenSSL): {bound:7.0f}"
        f" MB/s; copier = {best / bound:.3f}x the bound, convert = {reference / bound:.3f}x"
    )
    report.append(
        f"  copier process peak RSS: {peak:.1f} MiB ({before:.1f} MiB before the copy:"
        f" +{peak - before:.1f} MiB for {size_mib} MiB copied; the qemu-storage-daemons apart)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--opens", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2, help="rounds per path (best is kept)")
    parser.add_argument("--attaches", type=int, default=10, help="hot-plug attaches timed")
    parser.add_argument(
        "--only-attach", action="store_true", help="only the hot-plug attach figures"
    )
    parser.add_argument("--rotate-mib", type=int, default=128, help="re-encryption volume size")
    parser.add_argument("--only-rotate", action="store_true", help="only the re-encryption figures")
    parser.add_argument(
        "--container-runs",
        type=int,
        default=5,
        help="docker run starts timed per volume (0: no container section)",
    )
    parser.add_argument(
        "--container-size-mib", type=int, default=64, help="I/O inside the container (MiB)"
    )
    parser.add_argument("--only-containers", action="store_true",
                        help="only the container figures")  # fmt: skip
    parser.add_argument(
        "--file-dir",
        type=Path,
        default=Path("/dev/shm"),
        help="where file volumes and LUN backing files go (default tmpfs: the cipher, not a disk)",
    )
    args = parser.parse_args()
    size = args.size_mib * MIB
    report: list[str] = []
    bound = openssl_xts_bound()
    nettle = nettle_xts_rate()
    gnutls = gnutls_xts_rate()
    report.append("# Encrypted volumes (benchmarks/volumes.py)")
    report.append(
        f"AES-256-XTS bound, one core (openssl speed -evp aes-256-xts): {bound:8.0f} MB/s"
    )
    if nettle is not None:
        report.append(
            f"nettle AES-256-XTS (QEMU 7.2's cipher backend), 4 MiB a call: {nettle:8.0f} MB/s"
            f" = {nettle / bound:.2f}x the bound"
        )
    if gnutls is not None:
        report.append(
            f"GnuTLS AES-256-XTS (a gnutls-built QEMU, nbdkit's luks filter): {gnutls:8.0f} MB/s"
            f" = {gnutls / bound:.2f}x the bound"
        )
    results: dict[str, dict[str, float]] = {}
    if not args.only_containers:
        with tempfile.TemporaryDirectory(prefix="tp-bench-rotate-", dir=args.file_dir) as fast:
            bench_rotation(Path(fast) / "files", args.rotate_mib, args.repeat, report)
        if args.only_rotate:
            print("\n".join(report))
            return
    # Containers on encrypted volumes: benchmarks/volume_plugin.py, as a section.
    if args.container_runs > 0:
        from volume_plugin import measure, summary  # benchmarks/ is on sys.path

        runs, mib = args.container_runs, args.container_size_mib
        report.append("\n## Containers: docker run -v trustplane volume vs local volume")
        report.extend("  " + line for line in summary(measure(runs, mib), runs, mib))
        if args.only_containers:
            print("\n".join(report))
            return
    with tempfile.TemporaryDirectory(prefix="tp-bench-volumes-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        with tempfile.TemporaryDirectory(prefix="tp-bench-attach-", dir=args.file_dir) as fast:
            bench_attach(work / "attach", Path(fast), args.attaches, report)
        if args.only_attach:
            print("\n".join(report))
            return
        with tempfile.TemporaryDirectory(prefix="tp-bench-volumes-", dir=args.file_dir) as fast:
            files = FileBackend(Path(fast) / "files")
            results["file"] = bench_backend(
                BackendKind.FILE, files, size, args.opens, args.repeat, report
            )
            with start_tgtd(work / "tgtd") as tgtd:
                iscsi = IscsiBackend(
                    Path(fast) / "luns", Endpoint(host="127.0.0.1", port=tgtd.port),
                    control_port=tgtd.control_port,
                )  # fmt: skip
                results["iscsi"] = bench_backend(
                    BackendKind.ISCSI, iscsi, size, args.opens, args.repeat, report
                )
        with start_ceph(work / "ceph") as ceph:
            client = ceph.client
            rbd = RbdBackend(
                ceph.pool, client.user, [Endpoint(host=client.mon_host, port=client.mon_port)],
                client.key_bytes,
            )  # fmt: skip
            results["rbd"] = bench_backend(
                BackendKind.RBD, rbd, size, args.opens, args.repeat, report
            )
    report.append("\n## Goal: encrypted >= 0.6x plain (min of write and read) per backend")
    for kind, rates in results.items():

        def ratio(label: str, rates: dict[str, float] = rates) -> float:
            return min(
                rates[f"{label} write"] / rates["raw write"],
                rates[f"{label} read"] / rates["raw read"],
            )

        labels = [key.removesuffix(" write") for key in rates if key.endswith(" write")]
        best = max((label for label in labels if label.startswith(CANDIDATES)), key=ratio)
        default = (
            "librbd LUKS2" if default_encryption(BackendKind(kind)).provider == "luks2" else DEFAULT
        )
        default_label = next(label for label in labels if label.startswith(default))
        # Reads of cached data: the cipher is the only work beside the copy.
        share = rates[f"{DEFAULT} read"] * MIB / 1e6 / bound
        report.append(
            f"  {kind:6s} default ({default_label}): {ratio(default_label):.2f}x plain,"
            f" {'met' if ratio(default_label) >= 0.6 else 'NOT met'};"
            f" faster path measured: {best}, {ratio(best):.2f}x"
            f" ({'met' if ratio(best) >= 0.6 else 'NOT met'})"
        )
        report.append(
            f"         QEMU's LUKS1 (aes-256-xts) reads at {share:.3f}x the AES-XTS bound"
            f" ({rates[f'{DEFAULT} read'] * MIB / 1e6:.0f} MB/s)"
        )
    print("\n".join(report))


if __name__ == "__main__":
    main()
