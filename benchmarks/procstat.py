"""What the benchmark reads about processes and the machine, from /proc."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds process ``pid`` has used so far (its own threads, not children)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the parenthesised command name, which may hold spaces;
    # utime and stime are fields 14 and 15 of the whole line.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """Return the peak resident set size (VmHWM) of process ``pid`` in MB (10**6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise ValueError(f"no VmHWM in /proc/{pid}/status")


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (the machine architecture when it has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages (the machine may be shared)."""
    return [round(x, 2) for x in os.getloadavg()]


def binary_version(binary: str) -> str:
    """Return the first line ``binary --version`` prints (``nsqd v1.3.0 (built w/go1.22)``)."""
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return (done.stdout or done.stderr).strip().splitlines()[0]


def machine_info(nsqd_binary: str) -> dict:
    """Describe the machine and software a run was measured on."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nsqd": binary_version(nsqd_binary),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load_average(),
    }
