"""Session fixture `dm_guest`: a QEMU guest whose kernel has device-mapper.

One guest for the whole test session (it boots in a few seconds under TCG,
longer on a loaded machine); `dm_guest.executor` runs tools inside it and
`dm_guest.scratch_disk()` lends a virtio disk. The first run on a machine
downloads the Debian cloud kernel (cached in /var/cache/trustplane-guest).
Importable from conftest.py and test modules (``from guest_fixture import
dm_guest``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from missing import component_missing

from trustplane.embedded.dm_guest import DmGuest, start_dm_guest
from trustplane.errors import TrustplaneError


@pytest.fixture(scope="session")
def dm_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmGuest]:
    """The running guest; stopped (through isa-debug-exit) at the end of the session."""
    try:
        guest = start_dm_guest(tmp_path_factory.mktemp("dm-guest"))
    except TrustplaneError as exc:
        component_missing("device-mapper test guest (QEMU + Debian cloud kernel)", str(exc))
    yield guest
    guest.stop()
    assert guest.exit_code == 0, f"the guest did not leave cleanly:\n{guest.console_tail()}"
