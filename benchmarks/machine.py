"""One line describing the machine a benchmark ran on, for the tables in benchmarks/README.md."""

from __future__ import annotations

import os
import platform


def describe(**versions: str) -> str:
    """CPU cores and model, Python, and the given library versions.

    Example:
        >>> describe(dsnb="0.1.0").endswith("dsnb 0.1.0")
        True
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    libraries = "".join(f", {name} {version}" for name, version in versions.items())
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU; Python {platform.python_version()}{libraries}"
