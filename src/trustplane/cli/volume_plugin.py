"""`trustplane volume-plugin`: the Docker volume plugin (also `agent --volume-plugin`).

`docker volume create -d trustplane --opt type=TYPE --opt size=1G NAME`
creates a volume through the control plane; `docker run -v NAME:/data`
opens it on this node for as long as a container uses it. `--key-lease
SECONDS` (off by default) lets a volume be opened again during a
control-plane outage with the key released for it at most SECONDS ago.
"""

from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from trustplane.cli.common import read_file, stdout
from trustplane.cli.node_options import (
    DEFAULT_NODE_KEY,
    DEFAULT_STATE_DIR,
    NodeKey,
    NodeName,
    ServerUrl,
    TransportStateDir,
)
from trustplane.cli.session import Ca
from trustplane.errors import MalformedError

if TYPE_CHECKING:
    from trustplane.agent.volume_plugin import VolumePluginServer

PluginSocket = Annotated[
    Path | None,
    typer.Option(
        "--plugin-socket",
        help="Socket dockerd finds the plugin on (default /run/docker/plugins/trustplane.sock).",
    ),
]
PluginRoot = Annotated[
    Path | None,
    typer.Option(
        "--plugin-root",
        help="The plugin's state and mount points (default /run/trustplane/volume-plugin).",
    ),
]
DefaultType = Annotated[
    str | None,
    typer.Option(help="Volume type when `docker volume create` gives no --opt type=."),
]
DefaultSize = Annotated[
    str | None, typer.Option(help="Size when `docker volume create` gives no --opt size= (1G).")
]
KeyLeaseSeconds = Annotated[
    float | None,
    typer.Option(
        "--key-lease",
        metavar="SECONDS",
        help="Keep each released volume key in memory this long (at most 3600; off by "
        "default) so the same volume reopens on this node while the control plane cannot "
        "be reached; each such open is logged and reported. A refusal is never overridden.",
    ),
]
CephKeyFile = Annotated[
    Path | None,
    typer.Option(help="This node's cephx key (`ceph auth get-key` output), for RBD volumes."),
]


def plugin_server(
    server_url: str,
    node: str,
    node_key: Path,
    ca: Path | None,
    *,
    socket: Path | None,
    root: Path | None,
    default_type: str | None,
    default_size: str | None,
    ceph_key_file: Path | None,
    key_lease: float | None = None,
    state_dir: Path | None = None,
) -> VolumePluginServer:
    """The plugin server for these options (checked before anything starts)."""
    # Imported here: the server pulls in uvicorn and the volume drivers.
    from trustplane.agent.volume_plugin import DEFAULT_ROOT, DEFAULT_SOCKET, VolumePluginServer
    from trustplane.api.volume_spec import parse_size
    from trustplane.client import connect_as_node
    from trustplane.crypto.node_assertion import load_node_key
    from trustplane.volumes.access import NodeCredentials
    from trustplane.volumes.attachers.docker_plugin.control_service import ControlVolumeService
    from trustplane.volumes.attachers.docker_plugin.driver import VolumeDriver
    from trustplane.volumes.attachers.docker_plugin.lease import KeyLease

    lease = None if key_lease is None else KeyLease(key_lease)
    signing = load_node_key(read_file(node_key, "--node-key"), f"--node-key {node_key}")
    size = None if default_size is None else parse_size(default_size)
    credentials = NodeCredentials()
    if ceph_key_file is not None:
        text = read_file(ceph_key_file, "--ceph-key-file").strip()
        try:
            credentials = NodeCredentials(ceph_key=base64.b64decode(text, validate=True))
        except (ValueError, binascii.Error):
            raise MalformedError(f"--ceph-key-file {ceph_key_file}: not a cephx key") from None
    service = ControlVolumeService(
        lambda: connect_as_node(server_url, node, signing, ca), credentials, state_dir=state_dir
    )
    driver = VolumeDriver(
        service, root or DEFAULT_ROOT, default_type=default_type, default_size=size,
        key_lease=lease,
    )  # fmt: skip
    return VolumePluginServer(driver, socket or DEFAULT_SOCKET)


def volume_plugin(
    server_url: ServerUrl,
    node: NodeName,
    node_key: NodeKey = DEFAULT_NODE_KEY,
    ca: Ca = None,
    plugin_socket: PluginSocket = None,
    plugin_root: PluginRoot = None,
    default_type: DefaultType = None,
    default_size: DefaultSize = None,
    ceph_key_file: CephKeyFile = None,
    key_lease: KeyLeaseSeconds = None,
    state_dir: TransportStateDir = DEFAULT_STATE_DIR,
) -> None:
    """Serve Docker's volume plugin protocol: encrypted control-plane volumes for containers."""
    server = plugin_server(
        server_url, node, node_key, ca, socket=plugin_socket, root=plugin_root,
        default_type=default_type, default_size=default_size, ceph_key_file=ceph_key_file,
        key_lease=key_lease, state_dir=state_dir,
    )  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stdout.print(f"volume plugin for node {node} on unix://{server.socket}", highlight=False)
    server.run()
