"""A gateway's configuration as a TOML file, for `trustplane agent --gateway-config`.

The keys are the `trustplane gateway` options (underscores for dashes),
every one of them, with the same defaults (defaults.py);
`server`, `ca`, `node` and `node_key` default to the agent's own, so the
agent's node is the gateway's identity (and `workers` above 1 is refused
there: the agent's gateway is one thread). Unknown keys and wrong types are
refused, in one line, before anything starts::

    listen = "unix:///run/trustplane/docker.sock"
    docker = "unix:///var/run/docker.sock"
    signature_keys = ["/etc/trustplane/cosign.pub"]
    require_signatures = true
    require_scoped_tokens = true

    [monitor]
    cpu_threshold = 80.0
    sustain = 30.0
    source = "auto"              # or "cgroup", "stats"
    allow_blind = false          # refuse starts while the monitor cannot sample

    [mqtt]
    url = "mqtts://broker:8883"
    password_file = "/etc/trustplane/mqtt.password"
    nonce_file = "/var/lib/trustplane/gateway/mqtt-nonces.json"
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trustplane.errors import UsageError
from trustplane.gateway import defaults
from trustplane.gateway.control_link import NodeCredential
from trustplane.gateway.image_signatures import load_policy
from trustplane.gateway.monitor import Source, Thresholds
from trustplane.gateway.mqtt_link import MqttConfig
from trustplane.gateway.service import GatewayConfig, check_categories, unix_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Monitor(_Strict):
    cpu_threshold: float = defaults.CPU_THRESHOLD
    memory_threshold: float = defaults.MEMORY_THRESHOLD
    sustain: float = Field(defaults.SUSTAIN, gt=0)
    interval: float = Field(defaults.MONITOR_INTERVAL, gt=0)
    source: Source = defaults.MONITOR_SOURCE
    cgroup_root: Path = defaults.CGROUP_ROOT
    allow_blind: bool = defaults.ALLOW_BLIND_MONITOR


class _Mqtt(_Strict):
    url: str
    password_file: Path
    user: str | None = None
    ca: Path | None = None
    status_interval: float = Field(defaults.STATUS_INTERVAL, gt=0)
    nonce_file: Path = defaults.NONCE_FILE


class _File(_Strict):
    listen: str = defaults.LISTEN
    docker: str = defaults.DOCKER
    server: str | None = None
    ca: Path | None = None
    node: str | None = None
    node_key: Path | None = None
    token_file: Path | None = None
    allow_host_access: list[str] = Field(default_factory=list)
    socket_mode: str = Field(f"{defaults.SOCKET_MODE:o}", pattern=r"^[0-7]{3,4}$")
    allowed_uids: list[int] = Field(default_factory=list)
    control_timeout: float = Field(defaults.CONTROL_TIMEOUT, gt=0)
    signature_keys: list[Path] = Field(default_factory=list)
    require_signatures: bool = False
    require_scoped_tokens: bool = False
    authz_plugin: str | None = None
    workers: int = Field(defaults.WORKERS, ge=1, le=defaults.MAX_WORKERS)
    monitor: _Monitor = Field(default_factory=_Monitor)
    mqtt: _Mqtt | None = None


def load_gateway_config(
    path: Path, *, server: str, ca_file: Path | None, node: str, node_key: Path
) -> GatewayConfig:
    """The gateway configuration in `path`, with the agent's identity as defaults."""
    try:
        document: dict[str, Any] = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"gateway config {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"gateway config {path}: not TOML ({exc})") from None
    # Validated as JSON: strict types, yet paths may be strings (TOML has no paths).
    try:
        options = _File.model_validate_json(json.dumps(document, default=str))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top)"
        raise UsageError(f"gateway config {path}: {where}: {first['msg']}") from None
    own_node = options.node or (None if options.token_file else node)
    own_key = options.node_key or (node_key if own_node == node else None)
    if own_node is not None and own_key is None:
        raise UsageError(f"gateway config {path}: node {own_node} needs node_key")
    mqtt = None
    if options.mqtt is not None:
        user = options.mqtt.user or own_node
        if user is None:
            raise UsageError(f"gateway config {path}: mqtt needs a user (or a node)")
        mqtt = MqttConfig(
            options.mqtt.url,
            user,
            options.mqtt.password_file,
            options.mqtt.ca,
            options.mqtt.status_interval,
            options.mqtt.nonce_file,
        )
    return GatewayConfig(
        listen=unix_path(options.listen, "listen"),
        docker=unix_path(options.docker, "docker"),
        server=options.server or server,
        ca_file=options.ca or ca_file,
        node=NodeCredential(own_node, own_key) if own_node and own_key else None,
        token_file=options.token_file,
        allow_host_access=check_categories(options.allow_host_access),
        socket_mode=int(options.socket_mode, 8),
        control_timeout=options.control_timeout,
        allowed_uids=frozenset(options.allowed_uids),
        thresholds=Thresholds(
            options.monitor.cpu_threshold,
            options.monitor.memory_threshold,
            options.monitor.sustain,
            options.monitor.interval,
        ),
        mqtt=mqtt,
        authz_plugin=unix_path(options.authz_plugin, "authz_plugin")
        if options.authz_plugin
        else None,
        workers=options.workers,
        signatures=load_policy(options.signature_keys, options.require_signatures),
        require_scoped_tokens=options.require_scoped_tokens,
        monitor_source=options.monitor.source,
        cgroup_root=options.monitor.cgroup_root,
        allow_blind_monitor=options.monitor.allow_blind,
    )
