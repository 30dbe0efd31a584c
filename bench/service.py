"""Runs the real service as its own process (as users run it) and reads its peak memory."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


class ServiceProcess:
    def __init__(self, data_dir: Path, config: dict[str, Any]) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        config_file = data_dir / "config.yaml"
        config_file.write_text(yaml.safe_dump(config))
        self._log = open(data_dir / "service.log", "w+")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "serve",
                "--config",
                str(config_file),
                "--data-dir",
                str(data_dir),
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "INFO",
            ],
            stderr=self._log,
            stdout=subprocess.DEVNULL,
        )
        self.address = self._wait_for_address(data_dir / "service.log")

    def _wait_for_address(self, log: Path) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if "serving REAPI v2 on " in line:
                    return line.split("serving REAPI v2 on ", 1)[1].split()[0]
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited:\n{log.read_text()}")
            time.sleep(0.05)
        raise RuntimeError("service did not start")

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self._log.close()
