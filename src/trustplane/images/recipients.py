"""Who may open an encrypted image, and how far: `jwe:KEY.pem[:tier=N]`, or
`kms:NAME[:tier=N]` for a recipient whose private key stays in the KMS.

A recipient with `tier=N` gets the layers up to index N (0-based); without a
tier it gets every layer. Each encrypted layer's JWE names exactly the
recipients whose tier reaches it, so any ocicrypt tool given a tier-N key
opens exactly those layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trustplane.crypto.keys import RecipientKey, load_recipient_key
from trustplane.errors import UsageError, from_os_error

_OPTION = re.compile(r"^(?P<path>.+):(?P<name>[a-z]+)=(?P<value>[^:/]*)$")
"""A trailing `:NAME=VALUE`; `tier` is the only option there is."""


@dataclass(frozen=True)
class Recipient:
    key: RecipientKey
    tier: int | None
    """Highest layer index this recipient may open; None: all of them."""

    def reaches(self, layer: int) -> bool:
        return self.tier is None or layer <= self.tier


def parse_recipient(spec: str, kms: Callable[[str], bytes] | None = None) -> Recipient:
    """`kms` fetches a KMS recipient's public key (PEM) by name."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in ("jwe", "kms") or not rest:
        raise UsageError(
            f"--recipient {spec!r}: expected jwe:PUBKEY.pem[:tier=N] or kms:NAME[:tier=N]"
        )
    tier = None
    # A key file whose name merely looks like an option is taken as the file.
    if (match := _OPTION.match(rest)) and not Path(rest).exists():
        if match["name"] != "tier":
            raise UsageError(
                f"--recipient {spec!r}: unknown option {match['name']!r} (only tier=N)"
            )
        if not match["value"].isdigit():
            raise UsageError(
                f"--recipient {spec!r}: tier={match['value']!r}: give a layer index (0, 1, ...)"
            )
        rest, tier = match["path"], int(match["value"])
    if scheme == "kms":
        if kms is None:
            raise UsageError(f"--recipient {spec!r}: kms: recipients need a control plane (login)")
        return Recipient(key=load_recipient_key(kms(rest), f"kms:{rest}"), tier=tier)
    path = Path(rest)
    try:
        data = path.read_bytes()
    except OSError as exc:
        error = from_os_error(exc, path)
        if error is None:
            raise
        raise type(error)(f"--recipient {spec!r}: {error}") from None
    return Recipient(key=load_recipient_key(data, str(path)), tier=tier)


def for_layer(recipients: Sequence[Recipient], layer: int) -> list[RecipientKey]:
    return [r.key for r in recipients if r.reaches(layer)]
