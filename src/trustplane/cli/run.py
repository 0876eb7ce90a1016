"""`trustplane run IMAGE`: start a container on this node, zero trust.

The container starts only when the signature is valid, the layers match the
reference measurements, the node is attested and the start is authorized;
otherwise one error line names the check that failed (agent/zero_trust.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli.common import (
    AsJson,
    AuthFile,
    Quiet,
    emit_json,
    endpoint,
    read_file,
    stderr,
    stdout,
)
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
from trustplane.errors import UsageError
from trustplane.oci import reference


def run(
    image: Annotated[str, typer.Argument(help="docker://HOST/REPO:TAG (or @DIGEST) to run.")],
    key: Annotated[
        Path, typer.Option("--key", "-k", help="The publisher's public key (PEM, as cosign.pub).")
    ],
    server_url: ServerUrl,
    node: NodeName,
    command: Annotated[
        list[str] | None, typer.Argument(help="Command for the container (default: the image's).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the container.")] = None,
    tpm: TpmTcti = DEFAULT_TPM,
    node_key: NodeKey = DEFAULT_NODE_KEY,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    ca: Ca = None,
    pcr: Pcr = DEFAULT_PCR,
    insecure_resettable_pcr_for_tests: InsecureResettablePcr = False,
    docker: Annotated[
        str,
        typer.Option(
            "--docker",
            help="Docker Engine API: unix:///PATH (or just the path) or tcp://HOST:PORT.",
        ),
    ] = "unix:///var/run/docker.sock",
    authfile: AuthFile = None,
    tls_verify: Annotated[bool, typer.Option("--tls-verify/--no-tls-verify")] = True,
    cacert: Annotated[Path | None, typer.Option(help="CA bundle for the registry.")] = None,
    creds: Annotated[str | None, typer.Option(help="USER:PASSWORD for the registry.")] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Start IMAGE only if its signature, layers, this node's attestation and the policy agree."""
    # Imported here: tpm2-pytss loads the TSS libraries, which no other command needs.
    from trustplane.agent.service import AgentConfig
    from trustplane.agent.zero_trust import RunRequest, run_image
    from trustplane.crypto.signing import load_verify_key
    from trustplane.progress import Reporter

    target = reference.parse(image)
    if not isinstance(target, reference.RegistryRef):
        raise UsageError(f"{image}: trustplane run takes a registry image, docker://HOST/REPO")
    verify_key = load_verify_key(read_file(key, "--key"), str(key))
    request = RunRequest(
        image=target,
        key=verify_key,
        node=AgentConfig(
            server_url=server_url,
            tcti=tpm,
            node=node,
            node_key=node_key,
            state_dir=state_dir,
            ca_file=ca,
            pcr=pcr,
            allow_resettable_pcr=insecure_resettable_pcr_for_tests,
        ),
        docker_url=f"unix://{docker}" if docker.startswith("/") else docker,
        name=name,
        command=tuple(command or ()),
        endpoint=endpoint(tls_verify, cacert, creds, authfile),
    )

    def say(line: str) -> None:
        if not quiet:
            stderr.print(f"[green]ok[/green] {line}")

    with Reporter(enabled=not quiet) as reporter:
        started = run_image(request, reporter, say)
    if as_json:
        emit_json(
            {
                "containerID": started.container_id,
                "name": started.name,
                "imageID": started.image_id,
                "repository": started.repository,
                "manifestDigest": started.manifest_digest,
                "attestation": started.attestation,
                "authorizationLogIndex": started.authorization_log_index,
            }
        )
        return
    stdout.print(
        f"started {started.name} ({started.container_id[:12]}) from "
        f"{started.repository}@{started.manifest_digest}"
    )
