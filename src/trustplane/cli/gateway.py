"""`trustplane gateway`: the edge gateway in front of dockerd."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli.common import input_file, stdout
from trustplane.cli.node_options import check_node_key
from trustplane.cli.session import Ca, ServerUrl
from trustplane.errors import UsageError
from trustplane.gateway import defaults


def gateway(
    server_url: ServerUrl,
    listen: Annotated[
        str, typer.Option(help="The gateway's socket (unix:///path).")
    ] = defaults.LISTEN,
    docker: Annotated[str, typer.Option(help="dockerd's socket (unix:///path).")] = defaults.DOCKER,
    ca: Ca = None,
    node: Annotated[str | None, typer.Option(help="This gateway's registered node name.")] = None,
    node_key: Annotated[
        Path | None,
        typer.Option(help="The node's private key (PEM) for its token.", callback=check_node_key),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="Instead of a node key: a file holding a token.")
    ] = None,
    allow_host_access: Annotated[
        list[str] | None,
        typer.Option(
            help="Allow privileged, host-bind, host-namespace, capabilities, devices or "
            "security-opt (repeatable; default: none)."
        ),
    ] = None,
    socket_mode: Annotated[
        str, typer.Option(help="Octal mode of the gateway's socket.")
    ] = f"{defaults.SOCKET_MODE:o}",
    allowed_uid: Annotated[
        list[int] | None,
        typer.Option(help="Local user ids (peer credentials) allowed on the socket; default: any."),
    ] = None,
    control_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the control plane before denying.")
    ] = defaults.CONTROL_TIMEOUT,
    cpu_threshold: Annotated[
        float, typer.Option(help="Monitor: CPU share of the host (%) a container may hold.")
    ] = defaults.CPU_THRESHOLD,
    memory_threshold: Annotated[
        float,
        typer.Option(help="Monitor: memory share (%) of its limit, or of the host without one."),
    ] = defaults.MEMORY_THRESHOLD,
    sustain: Annotated[
        float, typer.Option(help="Monitor: seconds over a threshold before the container stops.")
    ] = defaults.SUSTAIN,
    monitor_interval: Annotated[
        float, typer.Option(help="Monitor: seconds between samples.")
    ] = defaults.MONITOR_INTERVAL,
    monitor_source: Annotated[
        str,
        typer.Option(
            help="Monitor: sample cgroup files, else the Engine stats API (auto), or only one "
            "of them (cgroup, stats)."
        ),
    ] = defaults.MONITOR_SOURCE,
    cgroup_root: Annotated[
        Path, typer.Option(help="Monitor: where the host's cgroup filesystem is mounted.")
    ] = defaults.CGROUP_ROOT,
    allow_blind_monitor: Annotated[
        bool,
        typer.Option(
            help="Let containers start while the monitor cannot sample them (they run "
            "unwatched); by default such starts are refused."
        ),
    ] = defaults.ALLOW_BLIND_MONITOR,
    mqtt: Annotated[
        str | None, typer.Option(help="MQTT broker for commands (mqtts://HOST:PORT).")
    ] = None,
    mqtt_user: Annotated[
        str | None, typer.Option(help="Broker user (default: the node name).")
    ] = None,
    mqtt_password_file: Annotated[
        Path | None, typer.Option(help="File holding the broker password.")
    ] = None,
    mqtt_ca: Annotated[Path | None, typer.Option(help="CA of the broker's certificate.")] = None,
    status_interval: Annotated[
        float, typer.Option(help="Seconds between status reports over MQTT.")
    ] = defaults.STATUS_INTERVAL,
    mqtt_nonce_file: Annotated[
        Path,
        typer.Option(
            help="Where the nonces of accepted MQTT commands are kept until they expire "
            "(replays are refused across restarts)."
        ),
    ] = defaults.NONCE_FILE,
    authz_plugin: Annotated[
        str | None,
        typer.Option(
            help="Also serve a Docker authorization plugin on this socket "
            "(unix:///run/docker/plugins/NAME.sock; dockerd --authorization-plugin=NAME)."
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(min=1, max=defaults.MAX_WORKERS, help="Proxy processes sharing the socket."),
    ] = defaults.WORKERS,
    signature_key: Annotated[
        list[Path] | None,
        typer.Option(
            help="A public key (PEM, cosign's .pub) whose image signatures this gateway "
            "trusts (repeatable). Logged signatures must verify with one of them."
        ),
    ] = None,
    require_signatures: Annotated[
        bool, typer.Option(help="Refuse images with no logged signature.")
    ] = False,
    require_scoped_tokens: Annotated[
        bool, typer.Option(help="Refuse tokens not scoped to this gateway (login --gateway).")
    ] = False,
) -> None:
    """Authenticate, authorize and forward every Docker Engine API call."""
    from trustplane.gateway.control_link import NodeCredential
    from trustplane.gateway.image_signatures import load_policy
    from trustplane.gateway.monitor import Thresholds, check_source
    from trustplane.gateway.mqtt_link import MqttConfig
    from trustplane.gateway.service import GatewayConfig, check_categories, run, unix_path

    if (node is None) != (node_key is None):
        raise UsageError("--node and --node-key go together")
    if node is None and token_file is None:
        raise UsageError("the gateway needs --node and --node-key, or --token-file")
    for path, option in (
        (token_file, "--token-file"),
        (mqtt_password_file, "--mqtt-password-file"),
        (mqtt_ca, "--mqtt-ca"),
        *((key, "--signature-key") for key in signature_key or []),
    ):
        if path is not None:
            input_file(path, option)
    try:
        mode = int(socket_mode, 8)
    except ValueError:
        raise UsageError(f"--socket-mode {socket_mode!r} is not octal") from None
    mqtt_config = None
    if mqtt is not None:
        user = mqtt_user or node
        if user is None or mqtt_password_file is None:
            raise UsageError("--mqtt needs --mqtt-password-file and --mqtt-user (or --node)")
        mqtt_config = MqttConfig(
            mqtt, user, mqtt_password_file, mqtt_ca, status_interval, mqtt_nonce_file
        )
    config = GatewayConfig(
        listen=unix_path(listen, "--listen"),
        docker=unix_path(docker, "--docker"),
        server=server_url,
        ca_file=ca,
        node=NodeCredential(node, node_key) if node and node_key else None,
        token_file=token_file,
        allow_host_access=check_categories(allow_host_access or []),
        socket_mode=mode,
        control_timeout=control_timeout,
        allowed_uids=frozenset(allowed_uid or []),
        thresholds=Thresholds(cpu_threshold, memory_threshold, sustain, monitor_interval),
        mqtt=mqtt_config,
        authz_plugin=unix_path(authz_plugin, "--authz-plugin") if authz_plugin else None,
        workers=workers,
        signatures=load_policy(signature_key or [], require_signatures),
        require_scoped_tokens=require_scoped_tokens,
        monitor_source=check_source(monitor_source),
        cgroup_root=cgroup_root,
        allow_blind_monitor=allow_blind_monitor,
    )
    stdout.print(f"trustplane gateway on unix://{config.listen} -> unix://{config.docker}")
    run(config)
