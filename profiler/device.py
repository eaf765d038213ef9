"""Which machine a profile belongs to: a device fingerprint.

Memory and latency are facts about one device and one software stack, so the
catalog keys every measurement by a short hash of the CPU model, the GPU name
and driver (CUDA only) and the versions of the libraries that run the model.
A store copied to another machine keeps its old profiles apart from new ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
import shutil
import subprocess
from dataclasses import dataclass

from variants.backends import parse_device

log = logging.getLogger(__name__)

#: libraries whose version changes what a measurement means
_LIBRARIES = ("onnxruntime-gpu", "onnxruntime", "torch")


@dataclass(frozen=True)
class DeviceInfo:
    """A human-readable device description; ``fingerprint`` is its hash."""

    type: str  # "cpu" or "cuda"
    index: int
    cpu: str
    gpu: str | None
    driver: str | None
    versions: tuple[tuple[str, str], ...]

    @property
    def fingerprint(self) -> str:
        payload = {"type": self.type, "cpu": self.cpu, "gpu": self.gpu, "driver": self.driver,
                   "versions": dict(self.versions)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return self.gpu or self.cpu

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "type": self.type, "index": self.index,
                "cpu": self.cpu, "gpu": self.gpu, "driver": self.driver,
                "versions": dict(self.versions)}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _library_versions() -> tuple[tuple[str, str], ...]:
    from importlib import metadata

    out = []
    for dist in _LIBRARIES:
        try:
            out.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(out)


def _gpu(index: int) -> tuple[str | None, str | None]:
    """GPU name and driver through nvidia-smi, so that nothing GPU-specific is imported."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        log.warning("nvidia-smi not found: the device fingerprint has no GPU name or driver")
        return None, None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader",
                              "-i", str(index)], capture_output=True, text=True, timeout=30,
                             check=True).stdout
        name, _, driver = out.strip().partition(",")
        return name.strip() or None, driver.strip() or None
    except (subprocess.SubprocessError, OSError) as e:
        log.warning("nvidia-smi failed (%s): the device fingerprint has no GPU name", e)
        return None, None


@functools.lru_cache(maxsize=8)
def device_info(device: str = "cpu") -> DeviceInfo:
    """Describe ``device`` (``cpu``, ``cuda``, ``cuda:1``) on this machine."""
    kind, index = parse_device(device)
    gpu, driver = _gpu(index) if kind == "cuda" else (None, None)
    return DeviceInfo(kind, index, cpu_model(), gpu, driver, _library_versions())
