"""Settings: defaults < YAML file < SIDECAR_EXECUTOR_* environment variables < flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


class ServerSettings(Section):
    listen: str = Field("127.0.0.1:8980", description="HOST:PORT to serve on; loopback by default")
    max_message_bytes: int = Field(16 * MiB, ge=MiB)
    worker_name: str = Field("", description="ExecutedActionMetadata.worker; the hostname if empty")

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{value!r} is not HOST:PORT")
        return value


class StorageSettings(Section):
    max_bytes: int = Field(10 * GiB, ge=MiB, description="CAS size bound; LRU eviction above it")
    max_batch_total_size_bytes: int = Field(4 * MiB, ge=64 * 1024)
    upload_ttl_s: float = Field(3600, gt=0, description="how long an idle partial upload is kept")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SIDECAR_EXECUTOR_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Field(Path(".data"), description="CAS, action cache and exec roots")
    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()

    @model_validator(mode="after")
    def _batch_fits_in_a_message(self) -> Settings:
        if self.storage.max_batch_total_size_bytes > self.server.max_message_bytes - 64 * 1024:
            raise ValueError(
                "storage.max_batch_total_size_bytes must be at least 64 KiB below "
                "server.max_message_bytes"
            )
        return self


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
