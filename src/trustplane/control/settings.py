"""Server configuration: one optional YAML file plus the environment.

Precedence, highest first: command-line values, `TRUSTPLANE_*` environment
variables (nested with `__`, e.g. `TRUSTPLANE_KMIP__HOST`), the file
(`--config`, else `DATA_DIR/server.yaml` if present), defaults. With only a
data directory everything works: SQLite, a file KEK, an embedded CA.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from trustplane.api.volume_spec import BackendKind
from trustplane.errors import MalformedError, UsageError
from trustplane.trust.attestation import DEFAULT_PCR, check_measurement_pcr


class KmipSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 5696
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class AttestationSettings(BaseModel):
    """Remote attestation of nodes (TPM quotes) and what it gates."""

    pcrs: list[int] = Field(default_factory=lambda: [DEFAULT_PCR], min_length=1)
    """PCRs (sha256 bank) the nodes measure image layers into and quote: one
    of 0-15, which no one resets without a reboot (trust/attestation.py says
    why 13 is the default)."""
    insecure_resettable_pcrs_for_tests: bool = False
    """TESTS ONLY: also accept PCR 16 or 23, which any root user on a node can
    reset (tpm2_pcrreset); the verifier's boot record still catches a wiped
    log, but a node could then hide what it measured before its first quote."""
    max_age_seconds: int = Field(default=300, ge=1)
    """How long a passed attestation counts for key release; a node silent for
    longer loses its attested state (the verifier's sweep marks it stale)."""
    interval_seconds: int = Field(default=60, ge=1)
    """How often the verifier asks each node for a fresh quote (nodes read it
    with every nonce and attest at least this often)."""
    nonce_ttl_seconds: int = Field(default=60, ge=1, le=3600)
    challenge_ttl_seconds: int = Field(default=300, ge=1, le=86400)
    ek_ca_files: list[Path] = Field(default_factory=list)
    """PEM vendor CAs; when set, an EK certificate issued by one is required."""

    @model_validator(mode="after")
    def _measurement_pcrs(self) -> AttestationSettings:
        for pcr in self.pcrs:
            try:
                check_measurement_pcr(
                    pcr, allow_resettable_for_tests=self.insecure_resettable_pcrs_for_tests
                )
            except UsageError as exc:
                raise ValueError(f"pcrs: {exc}") from None
        return self


class MqttSettings(BaseModel):
    """The broker commands to gateways go through (none: commands are only signed)."""

    url: str | None = None
    """mqtts://HOST:PORT"""
    user: str = "trustplane-control"
    password_file: Path | None = None
    ca_file: Path | None = None


class TlsSettings(BaseModel):
    """An operator's own certificate; without it the server makes an embedded CA."""

    cert_file: Path | None = None
    key_file: Path | None = None


class VolumeBackendSettings(BaseModel):
    """One storage backend the block-storage service creates volumes on.

    `kind` says which fields it needs: file (`directory`), iscsi (`directory`
    for the LUNs' backing files, `portal`, optionally tgtd's `control_port`),
    lvm (`volume_group`), rbd (`pool`, `user`, `monitors`, `key_file`: the
    cephx key of `client.USER` as `ceph auth get-key` prints it, a 0600 file).
    """

    model_config = ConfigDict(extra="forbid")

    kind: BackendKind
    directory: Path | None = None
    portal: str | None = None
    """iSCSI: HOST:PORT where compute hosts reach tgtd."""
    control_port: int | None = Field(default=None, ge=1, le=65535)
    iqn_prefix: str | None = None
    volume_group: str | None = None
    pool: str | None = None
    user: str | None = None
    monitors: list[str] = Field(default_factory=list)
    """RBD: HOST:PORT of each monitor (its v1 address)."""
    key_file: Path | None = None

    @model_validator(mode="after")
    def _fields_of_kind(self) -> VolumeBackendSettings:
        needed = {
            BackendKind.FILE: ("directory",),
            BackendKind.ISCSI: ("directory", "portal"),
            BackendKind.LVM: ("volume_group",),
            BackendKind.RBD: ("pool", "user", "monitors", "key_file"),
        }[self.kind]
        missing = [name for name in needed if not getattr(self, name)]
        if missing:
            raise ValueError(f"a {self.kind} backend needs {', '.join(missing)}")
        return self


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRUSTPLANE_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path
    listen: str = "127.0.0.1:8443"
    database_url: str | None = None
    """SQLAlchemy URL; default: SQLite in the data directory."""
    kek: Literal["file", "kmip"] = "file"
    kek_file: Path | None = None
    """Default: DATA_DIR/kek.json (mode 0600). Replicas must share it."""
    kmip: KmipSettings = Field(default_factory=KmipSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    attestation: AttestationSettings = Field(default_factory=AttestationSettings)
    public_url: str | None = None
    """How clients reach this server (secret references are built from it)."""
    policy_file: Path | None = None
    """Default: DATA_DIR/policy.yaml, written with the default policy at first start."""
    token_ttl_seconds: int = Field(default=900, ge=30, le=86400)
    audience: str = "trustplane"
    """Audience of access tokens and node assertions; replicas must agree, so
    it is a name, not any one replica's URL."""
    log_origin: str | None = Field(default=None, min_length=1, max_length=200)
    """The checkpoints' origin line. Fixed at the first start (default
    trustplane/HOSTNAME of the first replica) and kept in the database, so
    replicas on other hosts sign the same log name."""
    log_batch_wait_ms: float = Field(default=2.0, ge=0, le=100)
    """How long the log sequencer waits to gather appends into one commit."""
    workers: int = Field(default=1, ge=1, le=64)
    volume_backends: dict[str, VolumeBackendSettings] = Field(default_factory=dict)
    """The block-storage service's backends by name (volume types name one)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileSource(settings_cls)

    @property
    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError(f"--listen {self.listen!r}: expected HOST:PORT")
        if not 0 < int(port) < 1 << 16:
            raise UsageError(f"--listen {self.listen!r}: a port is 1 to 65535")
        return host.strip("[]") or "127.0.0.1", int(port)

    @property
    def url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = self.host_port
        return f"https://{host}:{port}"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'trustplane.db'}"

    @property
    def kek_path(self) -> Path:
        return self.kek_file or self.data_dir / "kek.json"

    @property
    def policy_path(self) -> Path:
        return self.policy_file or self.data_dir / "policy.yaml"


_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar(
    "trustplane_settings_file", default=None
)


class _FileSource(PydanticBaseSettingsSource):
    """The configuration file's values, below the environment."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_FILE_VALUES.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_VALUES.get() or {})


def load_settings(
    data_dir: Path, config_file: Path | None = None, **overrides: Any
) -> ServerSettings:
    """Settings from `overrides` (the command line), the environment, the file."""
    path = config_file or data_dir / "server.yaml"
    values: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise MalformedError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise MalformedError(f"{path}: must be a mapping of settings")
        values = loaded
    elif config_file is not None:
        raise UsageError(f"--config {config_file}: no such file")
    token = _FILE_VALUES.set(values)
    try:
        given = {k: v for k, v in overrides.items() if v is not None}
        return ServerSettings(data_dir=data_dir, **given)
    except ValidationError as exc:  # one line: each setting and what is wrong with it
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        raise UsageError(f"invalid server settings: {problems}") from None
    except ValueError as exc:
        raise UsageError(f"invalid server settings: {exc}") from None
    finally:
        _FILE_VALUES.reset(token)
