"""`--gateway-config`: the TOML file's keys, the agent's identity as defaults, one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustplane.crypto.signing import generate_signing_key
from trustplane.errors import UsageError
from trustplane.gateway.config_file import load_gateway_config
from trustplane.gateway.service import GatewayConfig


def load(path: Path) -> GatewayConfig:
    """As `trustplane agent --node edge-1 --node-key /etc/edge-1.key` would."""
    return load_gateway_config(
        path,
        server="https://cp:8443",
        ca_file=Path("/etc/ca.pem"),
        node="edge-1",
        node_key=Path("/etc/edge-1.key"),
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_the_agent_identity_is_the_default_and_options_map_to_the_gateway(tmp_path: Path) -> None:
    key = tmp_path / "cosign.pub"
    key.write_bytes(generate_signing_key("ecdsa-p256").public.public_pem())
    config = load(
        write(
            tmp_path,
            f'listen = "unix:///run/tp/docker.sock"\nsignature_keys = ["{key}"]\n'
            "require_signatures = true\nrequire_scoped_tokens = true\n"
            'allow_host_access = ["privileged"]\nsocket_mode = "600"\n'
            "[monitor]\ncpu_threshold = 75.0\nsustain = 5\n"
            '[mqtt]\nurl = "mqtts://broker:8883"\npassword_file = "/etc/mqtt.pw"\n',
        )
    )
    assert config.listen == Path("/run/tp/docker.sock")
    assert config.docker == Path("/var/run/docker.sock")
    assert config.server == "https://cp:8443"
    assert config.node is not None
    assert (config.node.name, config.node.key_file) == ("edge-1", Path("/etc/edge-1.key"))
    assert len(config.signatures.keys) == 1
    assert config.signatures.required
    assert config.require_scoped_tokens
    assert config.allow_host_access == frozenset({"privileged"})
    assert config.socket_mode == 0o600
    assert (config.thresholds.cpu_percent, config.thresholds.sustain) == (75.0, 5.0)
    assert config.mqtt is not None
    assert config.mqtt.user == "edge-1"
    assert config.mqtt.nonce_file == Path("/var/lib/trustplane/gateway/mqtt-nonces.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1\n", "bogus: Extra inputs are not permitted"),
        ("listen = 3\n", "listen: Input should be a valid string"),
        ('require_signatures = "yes"\n', "require_signatures: Input should be a valid boolean"),
        ("[monitor]\ncpu_threshold = 150.0\n", "percentages"),
        ('socket_mode = "999"\n', "socket_mode"),
        ('listen = "relative.sock"\n', "listen must be unix:///absolute/path"),
        ("require_signatures = true\n", "needs at least one --signature-key"),
        ('signature_keys = ["/nonexistent/k.pub"]\n', "signature key /nonexistent/k.pub"),
        ("listen = [\n", "not TOML"),
        ('allow_host_access = ["everything"]\n', "unknown host access"),
    ],
)
def test_bad_configuration_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load(write(tmp_path, text))


def test_an_absent_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No such file"):
        load(tmp_path / "absent.toml")


def test_the_monitor_source_and_blindness_options(tmp_path: Path) -> None:
    default = load(write(tmp_path, ""))
    assert (default.monitor_source, default.allow_blind_monitor) == ("auto", False)
    assert default.cgroup_root == Path("/sys/fs/cgroup")
    config = load(
        write(
            tmp_path,
            '[monitor]\nsource = "cgroup"\ncgroup_root = "/host/cgroup"\nallow_blind = true\n',
        )
    )
    assert (config.monitor_source, config.allow_blind_monitor) == ("cgroup", True)
    assert config.cgroup_root == Path("/host/cgroup")
    with pytest.raises(UsageError, match=r"monitor\.source"):
        load(write(tmp_path, '[monitor]\nsource = "psutil"\n'))


def test_an_empty_file_is_the_cli_defaults(tmp_path: Path) -> None:
    """`trustplane gateway` with no options and an empty TOML file give the same gateway."""
    import inspect

    from trustplane.cli.gateway import gateway
    from trustplane.gateway import defaults

    config = load(write(tmp_path, ""))
    options = {name: p.default for name, p in inspect.signature(gateway).parameters.items()}
    assert config.listen == Path(options["listen"].removeprefix("unix://"))
    assert config.docker == Path(options["docker"].removeprefix("unix://"))
    assert config.socket_mode == int(options["socket_mode"], 8) == defaults.SOCKET_MODE
    assert config.control_timeout == options["control_timeout"] == defaults.CONTROL_TIMEOUT
    assert config.workers == options["workers"] == defaults.WORKERS
    assert config.thresholds.cpu_percent == options["cpu_threshold"]
    assert config.thresholds.memory_percent == options["memory_threshold"]
    assert config.thresholds.sustain == options["sustain"]
    assert config.thresholds.interval == options["monitor_interval"]
    assert config.monitor_source == options["monitor_source"] == defaults.MONITOR_SOURCE
    assert config.cgroup_root == options["cgroup_root"] == defaults.CGROUP_ROOT
    assert config.allow_blind_monitor == options["allow_blind_monitor"]
    mqtt = load(write(tmp_path, '[mqtt]\nurl = "mqtts://b:8883"\npassword_file = "/p"\n')).mqtt
    assert mqtt is not None
    assert mqtt.status_interval == options["status_interval"] == defaults.STATUS_INTERVAL
    assert mqtt.nonce_file == options["mqtt_nonce_file"] == defaults.NONCE_FILE
    # ... and GatewayConfig's own defaults are these too.
    bare = GatewayConfig(listen=config.listen, docker=config.docker, server=config.server)
    assert (bare.socket_mode, bare.control_timeout, bare.workers) == (
        config.socket_mode,
        config.control_timeout,
        config.workers,
    )
    assert bare.thresholds == config.thresholds
    assert (bare.monitor_source, bare.cgroup_root, bare.allow_blind_monitor) == (
        config.monitor_source,
        config.cgroup_root,
        config.allow_blind_monitor,
    )


def test_workers_is_an_option_of_the_file_too(tmp_path: Path) -> None:
    assert load(write(tmp_path, "workers = 1\n")).workers == 1
    assert load(write(tmp_path, "workers = 4\n")).workers == 4
    for bad in ("workers = 0\n", "workers = 65\n", 'workers = "2"\n'):
        with pytest.raises(UsageError, match="workers"):
            load(write(tmp_path, bad))


# `trustplane gateway` options whose TOML key is spelled otherwise (tables for
# the monitor and MQTT, plurals for lists); every other option is its own key.
OPTION_KEYS = {
    "server_url": "server",
    "allowed_uid": "allowed_uids",
    "signature_key": "signature_keys",
    "cpu_threshold": "monitor.cpu_threshold",
    "memory_threshold": "monitor.memory_threshold",
    "sustain": "monitor.sustain",
    "monitor_interval": "monitor.interval",
    "monitor_source": "monitor.source",
    "cgroup_root": "monitor.cgroup_root",
    "allow_blind_monitor": "monitor.allow_blind",
    "mqtt": "mqtt.url",
    "mqtt_user": "mqtt.user",
    "mqtt_password_file": "mqtt.password_file",
    "mqtt_ca": "mqtt.ca",
    "status_interval": "mqtt.status_interval",
    "mqtt_nonce_file": "mqtt.nonce_file",
}


def test_every_gateway_option_is_a_key_of_the_file() -> None:
    """An option added to `trustplane gateway` and forgotten in the TOML file fails here."""
    import inspect

    from trustplane.cli.gateway import gateway
    from trustplane.gateway import config_file

    keys = set(config_file._File.model_fields) - {"monitor", "mqtt"}
    keys |= {f"monitor.{name}" for name in config_file._Monitor.model_fields}
    keys |= {f"mqtt.{name}" for name in config_file._Mqtt.model_fields}
    options = {OPTION_KEYS.get(name, name) for name in inspect.signature(gateway).parameters}
    assert options == keys
