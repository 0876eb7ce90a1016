"""The demo's volumes scene on the session's Ceph and libvirtd (VMs) and its own dockerd
(containers through the volume plugin): it runs, and proves what it says."""

from __future__ import annotations

from pathlib import Path

import pytest
from missing import component_missing

from trustplane.cli.demo_volumes import NODE, volumes_scene
from trustplane.embedded.ceph import RunningCeph
from trustplane.embedded.guest_kernel import GuestKernel, guest_kernel
from trustplane.embedded.libvirtd import RunningLibvirtd
from trustplane.errors import TrustplaneError


@pytest.fixture(scope="module")
def kernel() -> GuestKernel:
    try:
        return guest_kernel()
    except TrustplaneError as exc:
        component_missing("guest kernel (linux-image-cloud-amd64, downloaded)", str(exc))


def test_volumes_scene(
    tmp_path: Path, ceph: RunningCeph, libvirtd: RunningLibvirtd, kernel: GuestKernel
) -> None:
    said: list[tuple[str, str]] = []
    proved: list[str] = []
    releases = volumes_scene(
        tmp_path, ceph, libvirtd, kernel, lambda a, b: said.append((a, b)), proved.append
    )
    mine = [(e["subject"], e["decision"]) for e in releases if e["subject"] == f"node:{NODE}"]
    assert mine == [(f"node:{NODE}", "allow")] * 2
    assert len(proved) == 7
    assert any(text.startswith("a container writes, another reads back") for text in proved)
    assert any(text.startswith("the last unmount closed it all") for text in proved)
    assert any("the VM reads: trustplane-demo-rbd-" in text for _, text in said)
    assert any("the VM reads: trustplane-demo-file-" in text for _, text in said)
