"""The gateway's defaults, written once.

`trustplane gateway`'s options (cli/gateway.py), the agent's gateway TOML
file (config_file.py) and `GatewayConfig` (service.py) all take them from
here, so a gateway behaves the same however it is started. Plain constants
in a module of their own: the CLI reads them without importing the gateway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

LISTEN = "unix:///run/trustplane/docker.sock"
DOCKER = "unix:///var/run/docker.sock"
SOCKET_MODE = 0o660
CONTROL_TIMEOUT = 5.0
"""Seconds to wait for the control plane before denying."""
CPU_THRESHOLD = 90.0
MEMORY_THRESHOLD = 90.0
SUSTAIN = 30.0
MONITOR_INTERVAL = 2.0
MONITOR_SOURCE: Final = "auto"
"""Sample cgroup files, else the Engine stats API."""
CGROUP_ROOT = Path("/sys/fs/cgroup")
ALLOW_BLIND_MONITOR = False
STATUS_INTERVAL = 10.0
"""Seconds between status reports over MQTT."""
NONCE_FILE = Path("/var/lib/trustplane/gateway/mqtt-nonces.json")
WORKERS = 1
MAX_WORKERS = 64
