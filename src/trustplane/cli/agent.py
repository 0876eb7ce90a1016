"""`trustplane agent`: the node agent (TPM enrolment and periodic attestation)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli.common import input_file, stdout
from trustplane.cli.node_options import (
    DEFAULT_NODE_KEY,
    DEFAULT_PCR,
    DEFAULT_STATE_DIR,
    DEFAULT_TPM,
    InsecureResettablePcr,
    NodeKey,
    NodeName,
    Pcr,
    ServerUrl,
    StateDir,
    TpmTcti,
)
from trustplane.cli.session import Ca
from trustplane.cli.volume_plugin import (
    CephKeyFile,
    DefaultSize,
    DefaultType,
    KeyLeaseSeconds,
    PluginRoot,
    PluginSocket,
    plugin_server,
)
from trustplane.errors import IntegrityError


def agent(
    server_url: ServerUrl,
    node: NodeName,
    tpm: TpmTcti = DEFAULT_TPM,
    node_key: NodeKey = DEFAULT_NODE_KEY,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    ca: Ca = None,
    pcr: Pcr = DEFAULT_PCR,
    insecure_resettable_pcr_for_tests: InsecureResettablePcr = False,
    interval: Annotated[float, typer.Option(min=1.0, help="Seconds between attestations.")] = 60.0,
    once: Annotated[bool, typer.Option(help="Enrol and attest once, then exit.")] = False,
    docker: Annotated[
        str | None,
        typer.Option(
            help="dockerd's Engine API (unix:///var/run/docker.sock): re-measure running "
            "containers against their registered file digests (off without it)."
        ),
    ] = None,
    runtime_interval: Annotated[
        float, typer.Option(min=1.0, help="Seconds between re-measurements of containers.")
    ] = 60.0,
    gateway_config: Annotated[
        Path | None,
        typer.Option(help="Also run the edge gateway in this process, configured by this TOML."),
    ] = None,
    volume_plugin: Annotated[
        bool,
        typer.Option(
            "--volume-plugin",
            help="Also serve the Docker volume plugin (trustplane volume-plugin) in this process.",
        ),
    ] = False,
    plugin_socket: PluginSocket = None,
    plugin_root: PluginRoot = None,
    default_type: DefaultType = None,
    default_size: DefaultSize = None,
    ceph_key_file: CephKeyFile = None,
    key_lease: KeyLeaseSeconds = None,
) -> None:
    """Enrol this node's TPM with the control plane, then attest on an interval."""
    # Imported here: tpm2-pytss loads the TSS libraries, which no other command needs.
    from trustplane.agent.attester import Verdict
    from trustplane.agent.runtime import ContainerCheck
    from trustplane.agent.service import Agent, AgentConfig
    from trustplane.gateway.config_file import load_gateway_config
    from trustplane.gateway.in_process import gateway_beside

    gateway = None  # checked before the agent touches its state: bad input changes nothing
    if gateway_config is not None:
        input_file(gateway_config, "--gateway-config")
        gateway = load_gateway_config(
            gateway_config, server=server_url, ca_file=ca, node=node, node_key=node_key
        )

    plugin = None
    if volume_plugin:
        plugin = plugin_server(
            server_url, node, node_key, ca, socket=plugin_socket, root=plugin_root,
            default_type=default_type, default_size=default_size, ceph_key_file=ceph_key_file,
            key_lease=key_lease, state_dir=state_dir,
        )  # fmt: skip

    service = Agent(
        AgentConfig(
            server_url=server_url,
            tcti=tpm,
            node=node,
            node_key=node_key,
            state_dir=state_dir,
            ca_file=ca,
            pcr=pcr,
            allow_resettable_pcr=insecure_resettable_pcr_for_tests,
            interval=interval,
            docker_url=docker,
            runtime_interval=runtime_interval,
        )
    )

    def report(verdict: Verdict) -> None:
        word = "attested" if verdict.passed else "attestation failed"
        stdout.print(f"{node}: {word}: {verdict.reason}", highlight=False)

    def report_runtime(results: list[ContainerCheck]) -> None:
        for check in results:
            if check.status in ("drift", "unmeasured") and not check.repeated:
                what = (
                    f"{len(check.drift.changed)} changed, {len(check.drift.missing)} missing, "
                    f"{len(check.drift.unexpected)} unexpected"
                    if check.status == "drift"
                    else check.reason
                )
                done = "stopped" if check.stopped else (check.action or "reported")
                stdout.print(
                    f"{node}: container {check.name} ({check.repository}): {check.status}: "
                    f"{what}; {done}",
                    highlight=False,
                )

    with gateway_beside(gateway), plugin.beside() if plugin else contextlib.nullcontext():
        last = service.run(rounds=1 if once else None, report=report, runtime_report=report_runtime)
    if once and (last is None or not last.passed):
        raise IntegrityError(f"{node}: attestation failed")
