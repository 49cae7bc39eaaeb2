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


def machine_cpu_times() -> tuple[int, int]:
    """The machine's (steal, total) CPU time so far, in clock ticks, from /proc/stat (0, 0 where it has none)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0, 0
    times = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (times[7] if len(times) > 7 else 0), sum(times)


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of the machine's CPU time the hypervisor gave to others between two
    :func:`machine_cpu_times` readings, in percent (None when it cannot tell).

    On a shared virtual machine this is CPU the workload did not get: a latency or throughput
    figure measured while it is high says more about the host than about the code.
    """
    total = after[1] - before[1]
    return round(100.0 * (after[0] - before[0]) / total, 1) if total > 0 else None


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
