"""The textbook consumer: High Performance Python's NSQ primes worker (Example 10-9), as the book has it.

One pynsq ``Reader`` with the default ``max_in_flight`` of 1; for each
message it decodes the JSON body, tests the number by trial division (2, then
odd numbers up to the square root), adds ``"prime"``, publishes the record to
``prime`` or ``non_prime`` with ``Writer.pub`` without waiting for nsqd's
answer, and finishes the message. Kept as the book wrote it, including its
quirks: 2 counts as not prime and 1 as prime. Two changes: the book's
``print`` of every published message is left out (it would only slow the
baseline down), and the Reader is created only once the Writer is connected,
so no message is handled before it can be published.

Run until killed (SIGTERM stops the IOLoop)::

    python -m benchmarks.textbook --topic numbers --channel bench --nsqd-tcp-address 127.0.0.1:4150
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from math import sqrt

import nsq
from tornado.ioloop import IOLoop

CONNECT_TIMEOUT = 30.0
POLL_INTERVAL = 0.01


def is_prime(number: int) -> bool:
    """Tell whether ``number`` is prime, by the book's trial division."""
    if number % 2 == 0:
        return False
    for i in range(3, int(sqrt(number)) + 1, 2):
        if number % i == 0:
            return False
    return True


def write_message(topic: str, data: bytes, writer: nsq.Writer) -> None:
    """Publish ``data`` to ``topic`` without waiting; on an error answer, report it and publish again."""

    def on_answer(conn, response) -> None:
        """The book's error handling: report a refused publish and try again."""
        if isinstance(response, nsq.Error):
            print(f"Error with Message: {data!r}: {response}", file=sys.stderr)
            write_message(topic, data, writer)

    writer.pub(topic, data, callback=on_answer)


def calculate_prime(message: nsq.Message, writer: nsq.Writer) -> None:
    """The book's handler: classify the number, publish the record, finish the message."""
    message.enable_async()
    data = json.loads(message.body)

    prime = is_prime(data["number"])
    data["prime"] = prime
    if prime:
        topic = "prime"
    else:
        topic = "non_prime"

    output_message = json.dumps(data).encode("utf8")
    write_message(topic, output_message, writer)
    message.finish()


def start_reader_when_connected(writer: nsq.Writer, args: argparse.Namespace, deadline: float) -> None:
    """Create the Reader once the Writer has a connection; exit 1 if none comes before ``deadline``."""
    if any(conn.connected() for conn in writer.conns.values()):
        nsq.Reader(
            message_handler=partial(calculate_prime, writer=writer),
            nsqd_tcp_addresses=args.nsqd_tcp_address,
            topic=args.topic,
            channel=args.channel,
        )
        return
    if time.monotonic() > deadline:
        print(f"no connection to nsqd at {args.nsqd_tcp_address} after {CONNECT_TIMEOUT:g}s", file=sys.stderr)
        sys.exit(1)
    IOLoop.current().call_later(POLL_INTERVAL, start_reader_when_connected, writer, args, deadline)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line: topic, channel, and the nsqd TCP addresses (read from and written to)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.textbook", description=__doc__.splitlines()[0])
    parser.add_argument("--topic", default="numbers")
    parser.add_argument("--channel", default="worker_group_a")
    parser.add_argument("--nsqd-tcp-address", action="append", required=True,
                        help="nsqd to read from and publish to (may be repeated)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the textbook consumer until SIGTERM or SIGINT."""
    args = parse_args(argv)
    writer = nsq.Writer(args.nsqd_tcp_address)
    IOLoop.current().add_callback(start_reader_when_connected, writer, args, time.monotonic() + CONNECT_TIMEOUT)
    nsq.run()


if __name__ == "__main__":
    main()
