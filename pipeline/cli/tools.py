"""Commands that prepare a machine: install-nsq, install-toxiproxy and certs."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import echo_err


@click.command("install-nsq")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the binaries (default: this environment's bin folder).")
def install_nsq_cmd(dest: Path | None) -> None:
    """Install nsqd, nsqlookupd, nsqadmin, nsq_tail, nsq_stat and nsq_to_nsq v1.3.0."""
    from pipeline.ops.install import install_nsq
    path = install_nsq(dest, log=echo_err)
    click.echo(str(path))


@click.command("install-toxiproxy")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the binaries (default: this environment's bin folder).")
def install_toxiproxy_cmd(dest: Path | None) -> None:
    """Install toxiproxy-server and toxiproxy-cli (pinned) for the chaos harness."""
    from pipeline.ops.install_toxiproxy import install_toxiproxy
    path = install_toxiproxy(dest, log=echo_err)
    click.echo(str(path))


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/tls"),
              show_default=True, help="Folder for the CA, nsqd's and the clients' certificates and keys.")
@click.option("--host", "hosts", multiple=True, default=("127.0.0.1", "localhost"), show_default=True,
              help="A host name or IP address nsqd's certificate is valid for (repeatable).")
def certs(out_dir: Path, hosts: tuple[str, ...]) -> None:
    """Create a development CA and certificates for TLS between the pipeline and nsqd."""
    from pipeline.ops.certs import create_dev_certs
    paths = create_dev_certs(out_dir, list(hosts))
    click.echo(f"wrote a CA, nsqd's certificate ({', '.join(hosts)}) and a client certificate to {out_dir}/;"
               " add to topology.yaml:", err=True)
    click.echo(paths.topology_section(), nl=False)

