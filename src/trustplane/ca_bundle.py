"""TLS client contexts that trust a given CA bundle (PEM) or the system's CAs.

`ssl` reports a file that holds no certificate as `[X509:
NO_CERTIFICATE_OR_CRL_FOUND]` and a directory as a bare OSError; every client
(registries, the control plane, the MQTT broker) builds its context here, so
a wrong `--ca`/`--dest-cacert` is one clear error naming the file.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from trustplane.errors import MalformedError, NotFoundError, UsageError, from_os_error


def client_context(ca_file: Path | None, what: str = "CA bundle") -> ssl.SSLContext:
    """A context verifying servers against `ca_file`, or the system's CAs when None."""
    if ca_file is None:
        return ssl.create_default_context()
    if ca_file.is_dir():
        raise UsageError(f"{what} {ca_file} is a directory; give the PEM file")
    if not ca_file.exists():
        raise NotFoundError(f"{what} {ca_file} does not exist")
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError:
        raise MalformedError(f"{what} {ca_file} holds no PEM certificate") from None
    except OSError as exc:
        raise from_os_error(exc, ca_file) or exc from None
