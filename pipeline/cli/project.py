"""``pipeline init DIR``: a new project that runs as it is (topology, stage, its test, sample data, README)."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import click

#: The ports a new project asks for first (NSQ's own defaults), in the order the template uses them.
PREFERRED = {"nsqd_tcp": 4150, "nsqd_http": 4151, "lookupd_tcp": 4160, "lookupd_http": 4161, "admin": 4171,
             "metrics": 9300}
_FALLBACK_FROM = 14150  # where the search for a free port starts when a preferred one is taken

TOPOLOGY = """\
# {name}: orders -> valued_orders. `pipeline check` validates this file (and imports the
# stage); nsq-pipeline's docs/TOPOLOGY.md lists every option; `pipeline render` shows what runs.
nsq:                                    # `pipeline up` starts these locally; state lives in var/
  nsqd:    [{{name: n0, tcp: 127.0.0.1:{nsqd_tcp}, http: 127.0.0.1:{nsqd_http}}}]
  lookupd: [{{tcp: 127.0.0.1:{lookupd_tcp}, http: 127.0.0.1:{lookupd_http}}}]
  admin:   127.0.0.1:{admin}                 # the nsqadmin console
  var_dir: var

topics:
  orders:        {{codec: json}}
  valued_orders: {{codec: json}}

stages:
  valuer:
    handler: stages:value_orders        # stages.py beside this file
    input: orders                       # records the stage rejects go to orders.dead, with the reason
    channel: valuer
    outputs: [valued_orders]
    replicas: 2
    batch: {{size: 100, wait_ms: 5}}
    max_tries: 5
    metrics_port: {metrics}                  # Prometheus /metrics: replica k on 127.0.0.1:{metrics}+k

producers:
  orders: {{topic: orders, chunk: 500}}
"""

STAGES = '''\
"""The stages of this project. A stage maps a batch of records to what it emits, per output."""
from pipeline import Batch, Emit


def value_orders(batch: Batch) -> Emit:
    """Value each order (qty x price); reject an order without a positive qty or a price."""
    valued = []
    for i, order in enumerate(batch.records):
        qty, price = order.get("qty"), order.get("price")
        if type(qty) is not int or qty <= 0:
            batch.reject(i, f"qty must be a positive integer, got {qty!r}")  # -> orders.dead
            continue
        if type(price) not in (int, float) or price < 0:
            batch.reject(i, f"price must be a number >= 0, got {price!r}")
            continue
        valued.append({**order, "value": round(qty * price, 2)})
    return {"valued_orders": valued}  # return {} to emit nothing
'''

TEST = '''\
"""Unit tests of the stages, run in-process with the runtime's own rules (pipeline.testing)."""
from pipeline.testing import run_stage

from stages import value_orders


OUTPUTS = ["valued_orders"]  # as topology.yaml declares the stage (or: run_stage("valuer", ..., topology=PATH))


def test_an_order_is_valued():
    result = run_stage(value_orders, [{"order": 1, "qty": 3, "price": 2.5}], outputs=OUTPUTS)
    assert [r["value"] for r in result.outputs["valued_orders"]] == [7.5]


def test_a_bad_order_goes_to_the_dead_letters_with_its_reason():
    result = run_stage(value_orders, [{"order": 2, "qty": 0, "price": 1.0}, {"order": 3, "qty": 1}],
                       outputs=OUTPUTS)
    assert result.outputs["valued_orders"] == []
    assert [reason for _, reason in result.dead] == ["qty must be a positive integer, got 0",
                                                     "price must be a number >= 0, got None"]
'''

README = """\
# {name}

A pipeline on nsq-pipeline: `orders` -> stage `valuer` (stages.py) -> `valued_orders`.

    pipeline up                                      # NSQ and the stage, under supervisord
    pipeline produce orders --from sample.jsonl      # publish the sample orders
    pipeline peek valued_orders -n 5                 # see results, left in place (bad orders:
                                                     # pipeline dead ls); pipeline tail follows new ones
    pytest                                           # the stage's unit tests
    pipeline down                                    # stop everything

Ports are in topology.yaml; `pipeline status` shows what runs; the console is nsqadmin.
"""

CONFTEST = '''\
"""Make the modules beside topology.yaml importable from the tests, as they are for the workers."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
'''


def sample_orders(count: int = 20) -> str:
    """JSON lines of ``count`` orders; every tenth has a bad qty or no price (the stage rejects those)."""
    lines = []
    for i in range(1, count + 1):
        order: dict = {"order": i, "customer": f"c{i % 4}", "qty": i % 5 + 1, "price": round(1.5 * (i % 7 + 1), 2)}
        if i % 10 == 0:
            order["qty"] = 0
        if i % 10 == 5:
            del order["price"]
        lines.append(order)
    import json
    return "".join(json.dumps(order) + "\n" for order in lines)


def free_ports() -> dict[str, int]:
    """A port per :data:`PREFERRED` name: the preferred one when it is free on 127.0.0.1 now, else another."""
    chosen: dict[str, int] = {}
    candidate = _FALLBACK_FROM
    for name, port in PREFERRED.items():
        while port in chosen.values() or not _free(port) or (name == "metrics" and not _free(port + 1)):
            port, candidate = candidate, candidate + 1
        chosen[name] = port
    return chosen


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def init(directory: Path) -> None:
    """Make a new project in DIRECTORY: topology.yaml, a stage, its test, sample data and a README.

    DIRECTORY must be empty or not exist yet. The project runs as it is:
    `cd DIRECTORY && pipeline up && pipeline produce orders --from sample.jsonl`.
    """
    if directory.exists() and any(directory.iterdir()):
        raise click.UsageError(f"{directory} is not empty; give a new or empty folder")
    ports = free_ports()
    name = directory.resolve().name
    directory.mkdir(parents=True, exist_ok=True)
    files = {"topology.yaml": TOPOLOGY.format(name=name, **ports), "stages.py": STAGES,
             "test_stages.py": TEST, "conftest.py": CONFTEST, "sample.jsonl": sample_orders(),
             "README.md": README.format(name=name), ".gitignore": "var/\n__pycache__/\n"}
    for file, text in files.items():
        (directory / file).write_text(text)
    click.echo(f"created {directory}/: {', '.join(f for f in files if not f.startswith('.'))}")
    click.echo("ports (free now): " + ", ".join(f"{k} {v}" for k, v in ports.items()))
    click.echo(f"next: cd {directory} && pipeline up && pipeline produce orders --from sample.jsonl "
               "&& pipeline peek valued_orders -n 5")
    sys.stdout.flush()
