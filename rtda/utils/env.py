"""What a measurement depends on: library versions, the device, threads and the machine's load."""
from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    """What a timing depends on: versions, the device's name, threads and the machine's load; on the CPU also
    the kernel set torch dispatches to (AVX2, AVX512, ...), which changes both speed and rounding."""
    env = {"torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env.update(device_name=_cpu_name(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    return {**env, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
