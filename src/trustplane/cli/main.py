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
from typing import Annotated, NoReturn

import typer
import typer.main

from trustplane import __version__
from trustplane.cli import admin, image, key, kms, log, server, store, volume
from trustplane.cli.agent import agent
from trustplane.cli.common import state_directory
from trustplane.cli.gateway import gateway
from trustplane.cli.run import run as run_image_command
from trustplane.cli.volume_plugin import volume_plugin
from trustplane.errors import ExitCode, TrustplaneError, from_os_error

app = typer.Typer(
    help="Confidential, trustworthy container images from build machine to edge host.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(image.app, name="image")
app.add_typer(key.app, name="key")
app.add_typer(log.app, name="log")
app.add_typer(store.app, name="store")
app.add_typer(volume.app, name="volume")
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
app.command()(store.snapshotter)
app.command(name="volume-plugin")(volume_plugin)


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

    if workdir is not None:
        state_directory(workdir, "--workdir")
    run_demo(workdir)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def run(argv: list[str] | None = None) -> NoReturn:
    """Parse and run one command; every way out is an exit code (README, "Exit codes").

    The command tree is invoked here rather than through Typer's standalone
    mode, which prints usage errors as a boxed panel and turns Ctrl-C into a
    silent exit: here both are one `trustplane: error:` line like every other
    expected failure.
    """
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    try:
        with command.make_context(PROG, list(args)) as context:
            command.invoke(context)
    except typer.Exit as exc:  # --help, and commands that choose their code
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # the parser's own usage errors
        _fail(_usage_message(exc), ExitCode.USAGE)
    except TrustplaneError as exc:
        _fail(str(exc), exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", ExitCode.INTERRUPTED)
    except OSError as exc:
        expected = from_os_error(exc)
        if expected is None:
            _bug(exc)
        _fail(str(expected), expected.exit_code)
    except Exception as exc:
        _bug(exc)
    sys.exit(ExitCode.OK)


PROG = "trustplane"


def _usage_message(exc: typer.TyperException) -> str:
    """One line: which command, what is wrong, where to look."""
    context = getattr(exc, "ctx", None)
    path = context.command_path if context is not None else PROG
    where = path.removeprefix(PROG).strip()
    where = f"{where}: " if where else ""
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already on stdout
        return f"{where}missing command (see the list above)"
    # Typer words a rejected choice "Value error, 'x' is not one of ...".
    message = exc.format_message().replace("Value error, ", "")
    return f"{where}{message} (see {path} --help)"


def _bug(exc: BaseException) -> NoReturn:
    if os.environ.get("TRUSTPLANE_DEBUG"):
        traceback.print_exc()
    _fail(
        f"internal error: {type(exc).__name__}: {exc} (a bug; TRUSTPLANE_DEBUG=1 shows where)",
        ExitCode.INTERNAL,
    )


def _fail(message: str, code: int) -> NoReturn:
    print(f"trustplane: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)
