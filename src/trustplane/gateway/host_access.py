"""Bodies that would give a container the host: refused unless configured.

A container that is privileged, binds a host path, joins a host namespace,
gains capabilities, devices, or drops its security profile can take the
edge host over, whatever the control plane authorized. The gateway refuses
each such request unless its configuration explicitly allows that category
(`--allow-host-access CATEGORY`). The categories:

- `privileged`: HostConfig.Privileged; exec `Privileged`. (Every HostConfig
  field is checked both under `HostConfig` and at the top level of a create
  body, where dockerd's deprecated embedded HostConfig reads it too.)
- `host-bind`: HostConfig.Binds with a host path; Mounts of type bind (or a
  volume whose driver is not confined, see below); VolumesFrom; a
  VolumeDriver that is not confined; `volumes/create` with a driver that is
  not confined. A named volume is not a host-path bind when its driver
  cannot reach a host path (`CONFINED_DRIVERS`): `local` without options
  (with them it binds any host path: `type=none,o=bind,device=/`), and
  trustplane's own plugin (`trustplane`: encrypted control-plane volumes,
  options `type` and `size` only). Any other plugin may mount what it
  likes, so it needs `host-bind`.
- `host-namespace`: Pid/Network/Ipc/UTS/Userns/Cgroupns mode `host`
  (sharing another container's, `container:NAME`, is allowed); build
  `networkmode=host`; a network whose driver is not bridge or overlay
  (macvlan, ipvlan: the host's own segment).
- `capabilities`: HostConfig.CapAdd, Capabilities.
- `devices`: Devices, DeviceRequests, DeviceCgroupRules (create and update).
- `security-opt`: SecurityOpt (seccomp, AppArmor, labels), MaskedPaths and
  ReadonlyPaths overrides.

A body that is not a JSON object, or whose fields have the wrong types, is
refused as malformed: what the gateway cannot read it does not forward.

Go's encoding/json (dockerd) matches object keys to fields without regard
to case, and takes the last of duplicate keys. So keys are compared here in
ASCII lower case, a key that repeats (in any case) is refused, and so is a
non-ASCII key (Go folds some, e.g. U+212A KELVIN SIGN to `k`).
"""

from __future__ import annotations

import json
from typing import Any

from trustplane.errors import MalformedError
from trustplane.gateway.actions import BodyCheck
from trustplane.gateway.request import Target

CATEGORIES = frozenset(
    {"privileged", "host-bind", "host-namespace", "capabilities", "devices", "security-opt"}
)
CONFINED_DRIVERS: dict[str, frozenset[str]] = {
    "local": frozenset(),
    "trustplane": frozenset({"type", "size"}),
}
"""Volume drivers whose volumes stay off the host's paths, with the options that keep them so."""
_NAMESPACES = ("pidmode", "networkmode", "ipcmode", "utsmode", "usernsmode", "cgroupnsmode")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object with lower-case keys; duplicate keys are refused."""
    if not body.strip():
        return {}

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if not key.isascii():
                raise MalformedError("the JSON body has a non-ASCII key")
            folded = key.lower()
            if folded in result:
                raise MalformedError(f"the JSON body repeats the key {key[:64]!r}")
            result[folded] = value
        return result

    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedError("the request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise MalformedError("the request body is not a JSON object")
    return document


def host_access(check: BodyCheck, target: Target, body: bytes) -> tuple[set[str], dict[str, Any]]:
    """The host-access categories a request asks for, and its parsed JSON body."""
    if check == "build":
        wanted: set[str] = set()
        if (target.one("networkmode") or "").lower() == "host":
            wanted.add("host-namespace")
        return wanted, {}
    if check == "none":
        if body:
            raise MalformedError("this call takes no request body")
        return set(), {}
    document = parse_json_object(body)
    if check == "json":
        return set(), document
    if check == "create":
        return _create(document), document
    if check == "exec":
        return ({"privileged"} if _bool(document, "privileged") else set()), document
    if check == "update":
        return _devices(document), document
    if check == "network":
        # macvlan / ipvlan put containers on the host's own network segment.
        driver = string_field(document, "driver")
        if driver not in ("", "bridge", "overlay") or "parent" in mapping_field(
            document, "options"
        ):
            return {"host-namespace"}, document
        return set(), document
    if check == "volume":
        confined = _confined(
            string_field(document, "driver"), mapping_field(document, "driveropts")
        )
        return (set() if confined else {"host-bind"}), document
    raise MalformedError(f"unknown body check {check}")


def _create(document: dict[str, Any]) -> set[str]:
    # dockerd's ContainerConfigWrapper still embeds a deprecated *HostConfig:
    # HostConfig fields at the top level of the body are read too (and used
    # whole when there is no "HostConfig" key). Both places are checked.
    return _host_config(mapping_field(document, "hostconfig")) | _host_config(document)


def _host_config(host: dict[str, Any]) -> set[str]:
    wanted: set[str] = set()
    if _bool(host, "privileged"):
        wanted.add("privileged")
    for bind in strings_field(host, "binds"):
        source = bind.split(":", 1)[0]
        if source.startswith("/") or source.startswith(".") or not source:
            wanted.add("host-bind")
    if strings_field(host, "volumesfrom") or not _confined(string_field(host, "volumedriver"), {}):
        wanted.add("host-bind")
    mounts = host.get("mounts")
    if mounts is not None:
        if not isinstance(mounts, list):
            raise MalformedError("HostConfig.Mounts must be a list")
        for mount in mounts:
            if not isinstance(mount, dict):
                raise MalformedError("HostConfig.Mounts entries must be objects")
            kind = string_field(mount, "type")
            if kind == "bind" or kind not in ("volume", "tmpfs"):
                wanted.add("host-bind")
            volume_options = mapping_field(mount, "volumeoptions")
            driver = mapping_field(volume_options, "driverconfig")
            if not _confined(string_field(driver, "name"), mapping_field(driver, "options")):
                wanted.add("host-bind")
    for mode in _NAMESPACES:
        value = string_field(host, mode).lower()
        if value == "host":
            wanted.add("host-namespace")
    if strings_field(host, "capadd") or strings_field(host, "capabilities"):
        wanted.add("capabilities")
    if strings_field(host, "securityopt") or host.get("maskedpaths") is not None:
        wanted.add("security-opt")
    if host.get("readonlypaths") is not None:
        wanted.add("security-opt")
    wanted |= _devices(host)
    return wanted


def _confined(driver: str, options: dict[str, Any]) -> bool:
    """True when volumes of `driver` with `options` cannot reach a host path."""
    allowed = CONFINED_DRIVERS.get(driver or "local")
    return allowed is not None and set(options) <= allowed


def _devices(document: dict[str, Any]) -> set[str]:
    for key in ("devices", "devicerequests", "devicecgrouprules"):
        value = document.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise MalformedError(f"{key} must be a list")
        if value:
            return {"devices"}
    return set()


def mapping_field(document: dict[str, Any], key: str) -> dict[str, Any]:
    """The object at `key` of a parsed body (keys lower-cased), {} when absent."""
    value = document.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedError(f"{key} must be an object")
    return value


def string_field(document: dict[str, Any], key: str) -> str:
    """The string at `key`, "" when absent; MalformedError for any other type."""
    value = document.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedError(f"{key} must be a string")
    return value


def _bool(document: dict[str, Any], key: str) -> bool:
    value = document.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MalformedError(f"{key} must be a boolean")
    return value


def strings_field(document: dict[str, Any], key: str) -> list[str]:
    """The list of strings at `key`, [] when absent; MalformedError otherwise."""
    value = document.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise MalformedError(f"{key} must be a list of strings")
    return value
