"""Which trustplane volumes a call uses, and what the caller must be allowed on each.

A trustplane volume's key is released by the control plane to the node
(the volume plugin), not to whoever asked dockerd for the mount. So the
gateway asks the control plane for the caller too, by the volume's name:

| call                                           | needs, on `volume:NAME`           |
|------------------------------------------------|-----------------------------------|
| container create naming an existing trustplane | `volume.attach`                   |
| volume (Binds `NAME:/path`, Mounts `volume`)   |                                   |
| … naming a volume that does not exist, with    | `volume.create` and `volume.attach` |
| `trustplane` as the driver dockerd would use   |                                   |
| container start/restart/unpause, exec, attach, | `volume.attach` for each of the   |
| archive, export… of a container with trustplane| container's trustplane mounts     |
| mounts                                         |                                   |
| `POST /volumes/create` with Driver `trustplane`| `volume.create`                   |
| `DELETE /volumes/NAME` of a trustplane volume  | `volume.delete`                   |
| `POST /volumes/prune`                          | `volume.delete` on `volume:*`     |

The driver of a named volume is dockerd's (`GET /volumes/NAME`: one read
per distinct name in a create). A name dockerd does not know would be
created by it with the request's driver (Mounts' DriverConfig.Name,
HostConfig.VolumeDriver, else `local`): when any of them is `trustplane`
it counts as a trustplane volume. An anonymous volume of the trustplane
driver (`Volumes`, a Mounts entry without Source, with that driver) is
refused: it would be a new volume nobody named. What dockerd creates after
the check is checked again on the created container (decide.py's
confirm_created): a trustplane mount that was not authorized removes the
container.
"""

from __future__ import annotations

import re
from typing import Any

from trustplane.errors import Forbidden, MalformedError
from trustplane.gateway.host_access import mapping_field, string_field, strings_field

DRIVER = "trustplane"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
"""dockerd's volume names (`[a-zA-Z0-9][a-zA-Z0-9_.-]`), bounded."""


def volume_name(name: str) -> str:
    """`name` when it is a valid volume name; MalformedError otherwise."""
    if not _NAME.fullmatch(name):
        raise MalformedError(f"{name[:80]!r} is not a valid volume name")
    return name


def create_volumes(document: dict[str, Any]) -> dict[str, set[str]]:
    """The named volumes a container create uses: name → drivers dockerd could create it with.

    `document` is host_access.parse_json_object's (keys in lower case); its
    HostConfig fields are read both under `hostconfig` and at the top level,
    as dockerd does. Host paths are host_access's business and skipped here.
    """
    names: dict[str, set[str]] = {}
    hosts = [h for h in (mapping_field(document, "hostconfig"), document) if h]
    drivers = {string_field(h, "volumedriver") or "local" for h in hosts} or {"local"}
    if DRIVER in drivers and mapping_field(document, "volumes"):
        raise Forbidden(
            "trustplane gateway: anonymous trustplane volumes are refused; "
            "create the volume by name and mount it by name"
        )
    for host in hosts:
        for bind in strings_field(host, "binds"):
            source = bind.split(":", 1)[0]
            if not source or source.startswith(("/", ".")):
                continue  # a host path (host_access)
            names.setdefault(volume_name(source), set()).update(drivers)
        mounts = host.get("mounts") or []
        if not isinstance(mounts, list):
            raise MalformedError("HostConfig.Mounts must be a list")
        for mount in mounts:
            if not isinstance(mount, dict):
                raise MalformedError("HostConfig.Mounts entries must be objects")
            if string_field(mount, "type") != "volume":
                continue
            config = mapping_field(mapping_field(mount, "volumeoptions"), "driverconfig")
            wanted = {string_field(config, "name") or "local"} | drivers
            source = string_field(mount, "source")
            if not source:
                if DRIVER in wanted:
                    raise Forbidden(
                        "trustplane gateway: anonymous trustplane volumes are refused; "
                        "create the volume by name and mount it by name"
                    )
                continue
            names.setdefault(volume_name(source), set()).update(wanted)
    return names


def container_volumes(container: dict[str, Any]) -> list[str]:
    """The trustplane volumes a container (dockerd's inspect answer) mounts."""
    mounts = container.get("Mounts")
    found: list[str] = []
    if not isinstance(mounts, list):
        return found
    for mount in mounts:
        if (
            isinstance(mount, dict)
            and mount.get("Type") == "volume"
            and mount.get("Driver") == DRIVER
            and isinstance(mount.get("Name"), str)
        ):
            found.append(str(mount["Name"]))
    return found
