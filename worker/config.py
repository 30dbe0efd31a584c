"""Settings: defaults < YAML file < SIDECAR_EXECUTOR_* environment variables < flags."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

GiB = 1 << 30
MiB = 1 << 20


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSettings(Section):
    """TLS on the REAPI port, and client certificates (docs/AUTH.md)."""

    cert_file: Path | None = Field(
        None, description="PEM certificate chain; setting it enables TLS"
    )
    key_file: Path | None = Field(None, description="PEM private key of cert_file")
    client_ca_file: Path | None = Field(
        None, description="PEM CA certificates; when set, every client must show one they signed"
    )

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("server.tls.cert_file and server.tls.key_file go together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError(
                "server.tls.client_ca_file needs server.tls.cert_file and key_file: client "
                "certificates are only checked over TLS"
            )
        return self


class AuthSettings(Section):
    """Bearer tokens every call but a health check must carry (docs/AUTH.md)."""

    token_file: Path | None = Field(
        None, description="tokens, one per line; re-read whenever the file changes"
    )


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT can only be reached from this host (`localhost` counts)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerSettings(Section):
    listen: str = Field("127.0.0.1:8980", description="HOST:PORT to serve on; loopback by default")
    max_message_bytes: int = Field(16 * MiB, ge=MiB)
    worker_name: str = Field("", description="ExecutedActionMetadata.worker; the hostname if empty")
    shutdown_grace_s: float = Field(
        30, ge=0, description="on SIGTERM, how long running actions may take to finish"
    )
    tls: TlsSettings = TlsSettings()
    auth: AuthSettings = AuthSettings()
    allow_insecure: bool = Field(
        False, description="serve a non-loopback listen address without authenticating clients"
    )
    health_listen: str | None = Field(
        None,
        description="serve: HOST:PORT of a plain-text port with gRPC health alone, for probes "
        "that cannot speak TLS to server.listen (Kubernetes' gRPC probe); off when unset",
    )

    @field_validator("listen", "health_listen")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{value!r} is not HOST:PORT")
        return value

    @model_validator(mode="after")
    def _exposed_port_authenticates(self) -> ServerSettings:
        if self.health_listen == self.listen and not self.listen.endswith(":0"):
            raise ValueError("server.health_listen must not be server.listen")
        if is_loopback(self.listen) or self.allow_insecure:
            return self
        if self.auth.token_file is None and self.tls.client_ca_file is None:
            raise ValueError(
                f"server.listen {self.listen} is reachable from other hosts but no client "
                "would be authenticated: set server.auth.token_file and/or "
                "server.tls.client_ca_file (with server.tls.cert_file and key_file), or "
                "server.allow_insecure: true to serve it unauthenticated on purpose"
            )
        return self


class StorageSettings(Section):
    max_bytes: int = Field(10 * GiB, ge=MiB, description="CAS size bound; LRU eviction above it")
    max_batch_total_size_bytes: int = Field(4 * MiB, ge=64 * 1024)
    upload_ttl_s: float = Field(3600, gt=0, description="how long an idle partial upload is kept")
    max_partial_uploads: int = Field(
        256, ge=1, description="interrupted uploads kept at once; more is RESOURCE_EXHAUSTED"
    )
    durability: Literal["none", "fsync"] = Field(
        "none",
        description="fsync: flush each blob (and action result) to disk before acknowledging "
        "it, so it survives a host crash; none: leave it to the kernel (survives a crash of "
        "the service); see docs/STORAGE.md",
    )


class PoolSettings(Section):
    """One pool of sidecars of one image (and user, network, limits)."""

    min_idle: int = Field(0, ge=0, description="sidecars kept warm even when unused")
    max_sidecars: int = Field(4, ge=1)
    idle_ttl_s: float = Field(
        300, gt=0, description="an idle sidecar above min_idle goes after this"
    )
    max_actions_per_sidecar: int = Field(1000, ge=1, description="recycled after this many actions")
    max_age_s: float = Field(3600, gt=0, description="recycled once this old")
    actions_per_sidecar: int = Field(1, ge=1, description="concurrent actions in one sidecar")
    cpus: float | None = Field(None, gt=0, description="CPU limit of each sidecar")
    memory_bytes: int | None = Field(None, ge=16 * MiB, description="memory limit of each sidecar")
    pids_limit: int | None = Field(4096, ge=16, description="process limit of each sidecar")
    dispatch: Literal["exec", "agent"] = Field(
        "agent",
        description="how actions start: a `docker exec` of the runner each, or a request to "
        "the agent that is the sidecar's main process",
    )
    pull_policy: Literal["if_not_present", "always"] = Field(
        "if_not_present",
        description="`always`: a tag is re-resolved (pulled) at most every pull_interval_s; "
        "an image named by digest is never pulled again",
    )
    pull_interval_s: float = Field(300, gt=0, description="pull_policy always: least time apart")
    scale_up_wait_s: float | None = Field(
        None,
        gt=0,
        description="autoscaling: when a lease waits longer than this, more sidecars are "
        "pre-warmed (one per waiting lease, at least one); off when unset",
    )
    when_drained: Literal["refuse", "wait"] = Field(
        "refuse",
        description="what a new action for a drained pool gets: UNAVAILABLE at once, or a wait "
        "until the drain is lifted",
    )


class ExecutionSettings(Section):
    enabled: bool = Field(True, description="serve Execution; false makes a cache-only server")
    docker_url: str = "unix:///var/run/docker.sock"
    runner_path: Path | None = Field(
        None, description="the static sidecar runner; default: the one `make` builds"
    )
    exec_root: Path | None = Field(
        None, description="shared with the sidecars at the same path; default DATA_DIR/exec"
    )
    max_concurrent_actions: int = Field(4, ge=1)
    max_sidecars_total: int = Field(
        16, ge=1, description="sidecars of all pools together; idle ones of other pools make room"
    )
    queue_size: int = Field(1000, ge=1, description="queued actions above this: RESOURCE_EXHAUSTED")
    default_timeout_s: float = Field(900, gt=0)
    max_timeout_s: float = Field(3600, gt=0)
    default_image: str | None = Field(None, description="for actions that name no image")
    allowed_images: list[str] = Field(["*"], description="fnmatch patterns of allowed images")
    default_user: str = Field("65534:65534", description="numeric uid:gid actions run as")
    allow_root: bool = Field(False, description="allow dockerRunAsRoot / dockerUser=0")
    allowed_networks: list[str] = Field(["none"], description="values dockerNetwork may take")
    ignored_properties: list[str] = Field(
        [], description="platform properties to accept and ignore"
    )
    pull_timeout_s: float = Field(300, gt=0)
    daemon_wait_s: float = Field(
        30, ge=0, description="how long an action not yet started waits for an absent daemon"
    )
    docker_timeout_s: float = Field(
        60, gt=0, description="longest wait for any other Docker call; longer is UNAVAILABLE"
    )
    max_output_bytes: int = Field(
        4 * GiB, ge=MiB, description="most bytes of outputs, stdout and stderr of one action"
    )
    max_input_depth: int = Field(
        256, ge=1, description="deepest input tree accepted; deeper is INVALID_ARGUMENT"
    )
    max_input_entries: int = Field(
        1_000_000, ge=1, description="most files, directories and symlinks in one input tree"
    )
    pool: PoolSettings = PoolSettings()
    image_pools: dict[str, PoolSettings] = Field(
        {}, description="per-image pool settings; min_idle > 0 pre-warms the image at startup"
    )

    @field_validator("default_user")
    @classmethod
    def _numeric_user(cls, value: str) -> str:
        uid, sep, gid = value.partition(":")
        if not (sep and uid.isascii() and uid.isdigit() and gid.isascii() and gid.isdigit()):
            raise ValueError(f"{value!r} is not a numeric uid:gid")
        return f"{int(uid)}:{int(gid)}"

    @model_validator(mode="before")
    @classmethod
    def _image_pools_inherit(cls, data: Any) -> Any:
        """An `image_pools` entry is `pool` with the fields it sets changed (an entry with only
        `min_idle` keeps the default limits), keyed by the image as clients name it (a
        `docker://` prefix is dropped, as it is from the platform property)."""
        if not isinstance(data, dict) or not isinstance(data.get("image_pools"), dict):
            return data
        base = data.get("pool") or {}
        if isinstance(base, PoolSettings):
            base = base.model_dump(exclude_unset=True)
        entries = {}
        for image, entry in data["image_pools"].items():
            if isinstance(entry, PoolSettings):
                entry = entry.model_dump(exclude_unset=True)
            key = image.removeprefix("docker://").strip() if isinstance(image, str) else image
            entries[key] = {**base, **entry} if isinstance(entry, dict) else entry
        return {**data, "image_pools": entries}

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> ExecutionSettings:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s must not exceed max_timeout_s")
        return self

    def pool_for(self, image: str) -> PoolSettings:
        return self.image_pools.get(image, self.pool)


class BotSettings(Section):
    """`sidecar-executor worker`: joining a Remote Workers API scheduler (BuildGrid) as a bot."""

    scheduler: str = Field(
        "", description="grpc://HOST:PORT or grpcs://HOST:PORT of the scheduler (Bots and CAS)"
    )
    instance: str = Field("", description="the scheduler's instance name")
    properties: list[str] = Field(
        [], description="extra KEY=VALUE properties offered to the scheduler; a key may repeat"
    )
    bot_id: str = Field(
        "", description="the bot's name at the scheduler; default: derived from the data dir"
    )
    root_certificates: Path | None = Field(
        None, description="PEM CA bundle for grpcs://; default: the system's"
    )
    poll_timeout_s: float = Field(
        60, ge=5, description="deadline of each UpdateBotSession long poll"
    )
    keepalive_s: float = Field(
        5, gt=0, description="longest pause between UpdateBotSession calls while leases run"
    )
    retry_max_s: float = Field(
        30, gt=0, description="longest pause between attempts to reach a lost scheduler"
    )

    @field_validator("properties")
    @classmethod
    def _key_value(cls, values: list[str]) -> list[str]:
        for value in values:
            key, sep, _ = value.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{value!r} is not KEY=VALUE")
        return values


class MetricsSettings(Section):
    listen: str | None = Field(
        None, description="HOST:PORT of the Prometheus endpoint (/metrics); off when unset"
    )

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        return None if value is None else ServerSettings._host_and_port(value)


class AdminSettings(Section):
    listen: str | None = Field(
        None,
        description="the admin gRPC interface: `unix:PATH` or a loopback HOST:PORT; default "
        "unix:DATA_DIR/admin.sock (never the REAPI port)",
    )
    reload_interval_s: float = Field(
        5, ge=0, description="how often the config file is checked for changes; 0: SIGHUP only"
    )

    @field_validator("listen")
    @classmethod
    def _unix_or_host_and_port(cls, value: str | None) -> str | None:
        if value is None or (value.startswith("unix:") and len(value) > len("unix:")):
            return value
        ServerSettings._host_and_port(value)
        if not is_loopback(value):
            # The admin interface authenticates nobody: whoever reaches it drains pools and
            # reads every operation name (docs/SECURITY.md).
            raise ValueError(
                f"{value!r} is reachable from other hosts and the admin interface checks no "
                "client: use unix:PATH or a loopback HOST:PORT"
            )
        return value


class HealthSettings(Section):
    """Start-up and gRPC health of the execution side (see docs/DEPLOY.md)."""

    startup_wait_s: float = Field(
        0, ge=0, description="how long start-up waits for the Docker daemon; 0: as long as it takes"
    )
    startup_backoff_max_s: float = Field(
        10, gt=0, description="longest pause between two tries to reach the daemon at start-up"
    )
    check_interval_s: float = Field(
        5, gt=0, description="how often the daemon and the exec root are checked for health"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SIDECAR_EXECUTOR_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Field(Path(".data"), description="CAS, action cache and exec roots")
    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    execution: ExecutionSettings = ExecutionSettings()
    bot: BotSettings = BotSettings()
    metrics: MetricsSettings = MetricsSettings()
    admin: AdminSettings = AdminSettings()

    health: HealthSettings = HealthSettings()

    @model_validator(mode="after")
    def _batch_fits_in_a_message(self) -> Settings:
        if self.storage.max_batch_total_size_bytes > self.server.max_message_bytes - 64 * 1024:
            raise ValueError(
                "storage.max_batch_total_size_bytes must be at least 64 KiB below "
                "server.max_message_bytes"
            )
        return self

    @property
    def exec_root(self) -> Path:
        return (self.execution.exec_root or self.data_dir / "exec").absolute()

    @property
    def admin_address(self) -> str:
        """Where the admin interface listens (and where the CLI finds it)."""
        return self.admin.listen or f"unix:{(self.data_dir / 'admin.sock').absolute()}"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Builds Settings with precedence flags > environment > YAML file > defaults.

    Raises pydantic.ValidationError naming the bad field, FileNotFoundError, or
    yaml.YAMLError.
    """
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"configuration file {config_file} does not exist")

    class _WithFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if config_file is not None:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
            return tuple(sources)

    return _WithFile(**overrides)
