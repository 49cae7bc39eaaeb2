"""Terminal tables for ``up`` and ``status`` (rich)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def console() -> Console:
    """A console that does not squeeze tables to 80 columns when output is piped."""
    import sys
    return Console(width=None if sys.stdout.isatty() else 160)


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def urls(topology) -> list[tuple[str, str]]:
    """The addresses an operator opens: nsqadmin and every nsqd's HTTP API."""
    found = [("nsqadmin", f"http://{topology.nsq.admin}/")] if topology.nsq.admin else []
    found += [(f"nsqd {n.name}", f"http://{n.http}/stats") for n in topology.nsq.nsqd]
    found += [(f"nsqlookupd {i}", f"http://{lookupd.http}/nodes") for i, lookupd in enumerate(topology.nsq.lookupd)]
    return found


def print_processes(topology, processes, console: Console) -> None:
    """Print the supervised processes and the URLs after ``up``."""
    table = Table(title="processes")
    for column in ("process", "state", "pid", "uptime"):
        table.add_column(column, justify="right" if column in ("pid", "uptime") else "left")
    for p in processes:
        table.add_row(p.name, p.state, str(p.pid or "-"), _uptime(p.uptime))
    console.print(table)
    for name, url in urls(topology):
        console.print(f"{name + ':':<14} {url}")


def print_status(report, console: Console) -> None:
    """Print a :class:`~pipeline.observe.status.Status` as tables, unhealthy rows in red."""
    if not report.supervisord:
        console.print("[red]supervisord is not running[/red] (start with `pipeline up`)")
    procs = Table(title="processes")
    for column in ("process", "state", "pid", "uptime", "restarts"):
        procs.add_column(column)
    for p in report.processes:
        style = None if p.state == "RUNNING" else "red"
        procs.add_row(p.name, p.state, str(p.pid or "-"), _uptime(p.uptime_s), str(p.restarts), style=style)
    console.print(procs)
    nodes = Table(title="nsqd")
    for column in ("node", "http", "health", "lookupds", "depth", "clients"):
        nodes.add_column(column)
    lookupds = len(report.lookupd)
    for n in report.nsqd:
        # a node some lookupd does not list is invisible to the consumers asking that lookupd
        style = None if n.health == "OK" and n.lookupds == lookupds else "red"
        nodes.add_row(n.name, n.http, n.health, f"{n.lookupds}/{lookupds}", str(n.depth), str(n.clients), style=style)
    console.print(nodes)
    if report.lookupd:
        table = Table(title="nsqlookupd")
        for column in ("http", "health", "nsqd registered"):
            table.add_column(column)
        for lk in report.lookupd:
            table.add_row(lk.http, lk.health, str(lk.nodes), style=None if lk.health == "OK" else "red")
        console.print(table)
    if report.replication:
        table = Table(title="replicated topics")
        for column in ("topic", "copies", "nsqd up", "state"):
            table.add_column(column)
        for r in report.replication:
            style = None if r.getting == r.copies else "red"
            table.add_row(r.topic, str(r.copies), f"{r.nsqd_up}/{r.nsqd}", r.state, style=style)
        console.print(table)
    console.print(_channels(report.channels))


def _channels(rows) -> Table:
    table = Table(title="topics / channels")
    columns = ("topic", "channel", "depth", "in-flight", "deferred", "requeued", "timed-out", "clients",
               "messages", "msg/s")
    for column in columns:
        table.add_column(column, justify="left" if column in ("topic", "channel") else "right")
    for r in rows:
        table.add_row(r.topic if not r.channel else "", r.channel or "(topic)", str(r.depth), str(r.in_flight),
                      str(r.deferred), str(r.requeued), str(r.timed_out), str(r.clients), str(r.messages),
                      f"{r.rate:g}")
    return table
