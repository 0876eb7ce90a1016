"""The `trustplane` entry point and its error contract.

Every expected failure is a TrustplaneError: one line on stderr, and the exit
code of its class (see errors.ExitCode and the README). Anything else is a
bug: one line too, and a traceback only with TRUSTPLANE_DEBUG=1.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from trustplane import __version__
from trustplane.cli import admin, image, key, kms, log, server
from trustplane.cli.agent import agent
from trustplane.cli.gateway import gateway
from trustplane.cli.run import run as run_image_command
from trustplane.errors import ExitCode, TrustplaneError

app = typer.Typer(
    help="Confidential, trustworthy container images from build machine to edge host.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(image.app, name="image")
app.add_typer(key.app, name="key")
app.add_typer(log.app, name="log")
app.add_typer(kms.secret_app, name="secret")
app.add_typer(kms.recipient_app, name="recipient")
app.add_typer(kms.kek_app, name="kek")
app.add_typer(admin.user_app, name="user")
app.add_typer(admin.node_app, name="node")
app.command()(admin.authorize)
app.command()(server.server)
app.command()(server.login)
app.command()(gateway)
app.command()(agent)
app.command(name="run")(run_image_command)


@app.command()
def demo(
    workdir: Annotated[
        Path | None,
        typer.Option(help="Keep keys, certificates and logs here (default: temporary)."),
    ] = None,
) -> None:
    """Run the end-to-end demonstration on loopback and say what each step proved."""
    # Imported here: the demo pulls in the embedded components, which no other
    # command needs, and start-up time counts for every command.
    from trustplane.cli.demo import run_demo

    run_demo(workdir)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def run() -> None:
    """Typer handles usage errors and --help (exit 2 and 0); we handle the rest."""
    try:
        app()
    except TrustplaneError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        if os.environ.get("TRUSTPLANE_DEBUG"):
            traceback.print_exc()
        _fail(
            f"internal error: {type(exc).__name__}: {exc} (a bug; TRUSTPLANE_DEBUG=1 shows where)",
            ExitCode.INTERNAL,
        )


def _fail(message: str, code: int) -> None:
    print(f"trustplane: error: {message}", file=sys.stderr)
    sys.exit(code)
