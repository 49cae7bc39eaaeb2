"""Start, watch and stop local NSQ processes (nsqd, nsqlookupd, nsqadmin).

Command lines are built by ``nsqd_args``, ``nsqlookupd_args`` and
``nsqadmin_args`` so the same flags serve a test fixture, the local launcher
and supervisord rendering; ``start_process`` only launches an argv and waits
for ``/ping``. Every listener binds 127.0.0.1 unless told otherwise. Example::

    from pipeline.ops.processes import start_nsqlookupd, start_nsqd

    lookupd = start_nsqlookupd(Path("var/log/nsqlookupd.log"))
    nsqd = start_nsqd(Path("var/nsqd/n0"), lookupd_tcp=[lookupd.tcp])
    ...
    nsqd.stop()
    lookupd.stop()
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import split_address
from pipeline.errors import ProcessError
from pipeline.ops.install import nsq_binary

#: Ignore *_proxy variables: every address here is local, and a proxy would
#: answer (or refuse) in nsqd's place.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_TCP_LISTEN = "0A"  # st column of /proc/net/tcp for a listening socket


#: Ports ``free_port`` has handed out in this process: never handed out twice.
_HANDED_OUT: set[int] = set()
_PICK = random.Random()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now and this process has not handed out before.

    The port is picked at random below the range the OS takes the local ports of
    outgoing connections from (``/proc/sys/net/ipv4/ip_local_port_range``): a
    port of that range can be given to a connection before its server binds it,
    and the OS's own pick (binding port 0) can return the same port to two calls
    in a row. When less than 1,000 ports lie below that range, any port from 1024 up.
    """
    return consecutive_free_ports(1, host)


def consecutive_free_ports(n: int, host: str = "127.0.0.1") -> int:
    """Return the first of ``n`` consecutive ports picked as :func:`free_port` picks one, and hand them all out.

    For a topology whose replicas take ``base + k`` (a stage's metrics port).
    """
    low = _ephemeral_low()
    floor, top = (max(1024, low - 20000), low) if low - 1024 >= 1000 + n else (1024, 65536)
    for _ in range(500):
        base = _PICK.randrange(floor, top - n + 1)
        ports = range(base, base + n)
        if not _HANDED_OUT.intersection(ports) and all(_bindable(host, port) for port in ports):
            _HANDED_OUT.update(ports)
            return base
    raise ProcessError(f"no {n} consecutive free TCP ports on {host} after 500 tries")


def _ephemeral_low() -> int:
    """The lowest port of the OS's range for outgoing connections (32768 when it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def nsqd_args(
    *,
    tcp: str,
    http: str,
    data_dir: str | Path,
    lookupd_tcp: Sequence[str] = (),
    broadcast: str = "127.0.0.1",
    extra: Sequence[str] = (),
    binary: str | None = None,
) -> list[str]:
    """Return the argv of an nsqd listening on ``tcp`` and ``http``, storing messages in ``data_dir``.

    HTTPS is switched off explicitly: nsqd binds its default 0.0.0.0:4152 as
    soon as TLS flags appear, which would escape the 127.0.0.1 rule. ``extra``
    comes last, so it can override any flag.
    """
    return [
        binary or nsq_binary("nsqd"),
        f"--tcp-address={tcp}",
        f"--http-address={http}",
        "--https-address=",
        f"--data-path={data_dir}",
        f"--broadcast-address={broadcast}",
        *(f"--lookupd-tcp-address={address}" for address in lookupd_tcp),
        *extra,
    ]


def nsqlookupd_args(*, tcp: str, http: str, broadcast: str = "127.0.0.1", binary: str | None = None) -> list[str]:
    """Return the argv of an nsqlookupd listening on ``tcp`` and ``http``.

    ``broadcast`` replaces the default (the OS hostname), which need not resolve.
    """
    return [
        binary or nsq_binary("nsqlookupd"),
        f"--tcp-address={tcp}",
        f"--http-address={http}",
        f"--broadcast-address={broadcast}",
    ]


def nsqadmin_args(*, http: str, lookupd_http: Sequence[str], binary: str | None = None) -> list[str]:
    """Return the argv of an nsqadmin serving ``http`` and finding nsqd through ``lookupd_http``."""
    return [
        binary or nsq_binary("nsqadmin"),
        f"--http-address={http}",
        *(f"--lookupd-http-address={address}" for address in lookupd_http),
    ]


@dataclass
class NsqProcess:
    """One running NSQ process started by :func:`start_process`, with the addresses it serves."""

    name: str
    argv: list[str]
    pid: int
    tcp: str | None
    http: str
    data_dir: Path | None
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the process (SIGTERM, then SIGKILL after ``grace`` seconds) and return its exit code."""
        if self.popen is not None and self.popen.poll() is not None:
            return self.popen.returncode
        code = stop_pid(self.pid, grace)
        if self.popen is not None and code is not None:
            # stop_pid reaped the child itself; tell Popen so it neither waits
            # again nor warns that the process is still running.
            self.popen.returncode = code
        return code

    def alive(self) -> bool:
        """Tell whether the process is still running (a zombie counts as dead)."""
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    http: str,
    log_path: Path,
    tcp: str | None = None,
    data_dir: Path | None = None,
    ping_timeout: float = 10.0,
) -> NsqProcess:
    """Launch ``argv`` with its output appended to ``log_path`` and return once ``/ping`` on ``http`` answers.

    The process gets its own session, so a Ctrl-C in the caller's terminal does
    not reach it and it is stopped only by :meth:`NsqProcess.stop`.

    Raises:
        ProcessError: if it cannot be launched, exits, or does not answer
            within ``ping_timeout`` seconds; the message ends with its last
            log line. The process is stopped before the error is raised.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log_start = log.tell()
        try:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise ProcessError(f"{name} could not be started ({argv[0]}): {e}") from e
    process = NsqProcess(name, list(argv), popen.pid, tcp, http, data_dir, log_path, popen)
    try:
        answered = wait_ping(http, time.monotonic() + ping_timeout, owner=popen.pid, alive=process.alive)
    except BaseException:
        process.stop()  # e.g. Ctrl-C while waiting: its own session would keep it running
        raise
    if answered:
        return process
    exited = popen.poll()  # read before stop(), which would report its own SIGTERM
    process.stop()
    if exited is not None:
        why = f"exited with code {exited} before answering /ping on {http}"
    else:
        why = f"did not answer /ping on {http} within {ping_timeout:g} s"
    raise ProcessError(f"{name} {why}: {_log_tail(log_path, log_start)} (log: {log_path})")


def wait_ping(
    http: str,
    deadline: float,
    *,
    owner: int | None = None,
    alive: Callable[[], bool] = lambda: True,
) -> bool:
    """Return True once ``/ping`` on ``http`` answers 200 OK; False at ``deadline`` or when ``alive()`` fails.

    ``deadline`` is a ``time.monotonic()`` value. With ``owner`` (a pid), an
    answer counts only if that process listens on the port: otherwise an old
    process still holding the port would pass for the new one.
    """
    interval = 0.005
    while alive():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if _ping(http, timeout=min(1.0, remaining)) and _owns_port(owner, http):
            return True
        time.sleep(min(interval, max(deadline - time.monotonic(), 0)))
        interval = min(interval * 2, 0.1)
    return False


def _ping(http: str, timeout: float) -> bool:
    """Tell whether ``/ping`` on ``http`` answers 200 ``OK`` within ``timeout`` seconds."""
    try:
        with _LOCAL.open(f"http://{http}/ping", timeout=timeout) as response:
            return response.status == 200 and response.read().strip() == b"OK"
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _owns_port(pid: int | None, address: str) -> bool:
    """Tell whether ``pid`` listens on the port of ``address`` (True when that cannot be checked)."""
    if pid is None:
        return True
    listening = listen_addresses(pid)
    if listening is None:
        return True
    port = split_address(address)[1]
    # listen_addresses writes IPv6 hosts in brackets, as topology.yaml does, so one parser reads both
    return any(split_address(entry)[1] == port for entry in listening)


def start_nsqd(
    data_dir: Path,
    *,
    tcp: str | None = None,
    http: str | None = None,
    lookupd_tcp: Sequence[str] = (),
    extra: Sequence[str] = (),
    name: str = "nsqd",
    log_path: Path | None = None,
    ping_timeout: float = 10.0,
) -> NsqProcess:
    """Start an nsqd storing into ``data_dir`` (created if needed) on free 127.0.0.1 ports unless given.

    Its output goes to ``log_path``, by default ``data_dir/<name>.log``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)

    def launch() -> NsqProcess:
        tcp_now, http_now = tcp or _free_address(), http or _free_address()
        argv = nsqd_args(tcp=tcp_now, http=http_now, data_dir=data_dir, lookupd_tcp=lookupd_tcp, extra=extra)
        return start_process(
            name, argv, http=http_now, tcp=tcp_now, data_dir=data_dir,
            log_path=log_path or data_dir / f"{name}.log", ping_timeout=ping_timeout,
        )

    return _retry_port_clash(launch, given=(tcp, http))


def start_nsqlookupd(
    log_path: Path,
    *,
    tcp: str | None = None,
    http: str | None = None,
    name: str = "nsqlookupd",
    ping_timeout: float = 10.0,
) -> NsqProcess:
    """Start an nsqlookupd logging to ``log_path``, on free 127.0.0.1 ports unless given."""

    def launch() -> NsqProcess:
        tcp_now, http_now = tcp or _free_address(), http or _free_address()
        argv = nsqlookupd_args(tcp=tcp_now, http=http_now)
        return start_process(
            name, argv, http=http_now, tcp=tcp_now, log_path=log_path, ping_timeout=ping_timeout
        )

    return _retry_port_clash(launch, given=(tcp, http))


def start_nsqadmin(
    lookupd_http: Sequence[str],
    *,
    log_path: Path,
    http: str | None = None,
    name: str = "nsqadmin",
    ping_timeout: float = 10.0,
) -> NsqProcess:
    """Start an nsqadmin that finds nsqd through ``lookupd_http``, on a free 127.0.0.1 port unless given."""

    def launch() -> NsqProcess:
        http_now = http or _free_address()
        argv = nsqadmin_args(http=http_now, lookupd_http=lookupd_http)
        return start_process(name, argv, http=http_now, log_path=log_path, ping_timeout=ping_timeout)

    return _retry_port_clash(launch, given=(http,))


def _free_address() -> str:
    """Return ``127.0.0.1:<free port>``."""
    return f"127.0.0.1:{free_port()}"


def _retry_port_clash(
    launch: Callable[[], NsqProcess], given: Sequence[str | None], attempts: int = 3
) -> NsqProcess:
    """Call ``launch`` again when a port it chose was taken before the process could bind it.

    ``free_port`` cannot reserve a port: another server, or the kernel handing
    it to an outgoing connection, can take it first. A clash on an address the
    caller ``given`` is not retried, since it would repeat.
    """
    for _ in range(attempts - 1):
        try:
            return launch()
        except ProcessError as e:
            message = str(e)
            if "address already in use" not in message or any(a and a in message for a in given):
                raise
    return launch()


def stop_pid(pid: int, grace: float = 10.0) -> int | None:
    """Stop process ``pid`` (SIGTERM, then SIGKILL after ``grace`` seconds); return its exit code when known.

    A child of ours is reaped and its code returned (negative: killed by that
    signal); any other process is watched until it is gone, and None returned.

    Raises:
        ProcessError: if the process outlives SIGKILL by 5 seconds (stuck in the kernel).
    """
    done, code = _reap(pid)
    if done:
        return code
    _signal(pid, signal.SIGTERM)
    done, code = _wait_gone(pid, time.monotonic() + grace)
    if done:
        return code
    _signal(pid, signal.SIGKILL)
    done, code = _wait_gone(pid, time.monotonic() + 5.0)
    if done:
        return code
    raise ProcessError(f"process {pid} is still running 5 s after SIGKILL")


def _signal(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid``; a process that is already gone is not an error."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, deadline: float) -> tuple[bool, int | None]:
    """Poll until ``pid`` is gone or ``deadline`` passes; return ``(gone, exit code if known)``."""
    interval = 0.002
    while True:
        done, code = _reap(pid)
        if done or time.monotonic() >= deadline:
            return done, code
        time.sleep(interval)
        interval = min(interval * 2, 0.05)


def _reap(pid: int) -> tuple[bool, int | None]:
    """Return ``(gone, exit code)`` for ``pid`` without blocking, reaping it if it is our child."""
    try:
        waited, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not pid_alive(pid), None
    if waited == 0:
        return False, None
    return True, os.waitstatus_to_exitcode(status)


def pid_alive(pid: int) -> bool:
    """Tell whether process ``pid`` exists and is not a zombie (whose parent has yet to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but belongs to another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): kill(0) is all we can know
    # The state follows the parenthesised command name, which may itself hold spaces.
    return stat.rpartition(")")[2].split()[0] != "Z"


def listen_addresses(pid: int) -> list[str] | None:
    """Return the TCP addresses ``pid`` listens on (``"127.0.0.1:4150"``, ``"[::]:4152"``), None without /proc.

    Read from ``/proc``, so it needs no tool and sees exactly this process's
    sockets, including ones bound to 0.0.0.0 or ``::``.
    """
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        # /proc is there but the process is not (it exited): it listens on nothing, and must not
        # pass for the owner of a port another process answers on.
        return [] if os.path.isdir("/proc/self/fd") else None
    except OSError:
        return None
    links = []
    for fd in fds:
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed meanwhile, or the process exited: that fd listens on nothing
            continue
    inodes = {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}
    found = []
    for table, decode in (("tcp", _decode_ipv4), ("tcp6", _decode_ipv6)):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == _TCP_LISTEN and cols[9] in inodes:
                host, port = cols[1].split(":")
                found.append(f"{decode(host)}:{int(port, 16)}")
    return found


def _decode_ipv4(hex_host: str) -> str:
    """Decode /proc/net/tcp's host field (one 32-bit word in host byte order, little-endian here)."""
    return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_host)[::-1])


def _decode_ipv6(hex_host: str) -> str:
    """Decode /proc/net/tcp6's host field (four 32-bit words, each in host byte order)."""
    raw = bytes.fromhex(hex_host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]"


def _log_tail(log_path: Path, start: int) -> str:
    """Return the last non-empty line written to ``log_path`` since offset ``start``."""
    try:
        with open(log_path, "rb") as log:
            log.seek(start)
            text = log.read()[-8192:].decode("utf-8", "replace")
    except OSError as e:
        return f"(log unreadable: {e})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
