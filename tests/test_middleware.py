"""Middleware hooks: order, and failures that never reach the worker."""
from __future__ import annotations

import logging

from pipeline.middleware import Middleware, MiddlewareStack


class Recorder(Middleware):
    def __init__(self, name, calls, fail=False):
        self.name, self.calls, self.fail = name, calls, fail

    def before_process_batch(self, worker, batch):
        self.calls.append(("before", self.name))
        if self.fail:
            raise RuntimeError("boom")

    def after_process_batch(self, worker, batch, *, result, exception):
        self.calls.append(("after", self.name))


def test_before_hooks_run_in_order_and_after_hooks_in_reverse():
    calls = []
    stack = MiddlewareStack([Recorder("a", calls), Recorder("b", calls)])
    stack.emit_before("before_process_batch", None, None)
    stack.emit_after("after_process_batch", None, None, result={}, exception=None)
    assert calls == [("before", "a"), ("before", "b"), ("after", "b"), ("after", "a")]


def test_a_failing_hook_is_logged_critical_and_the_others_still_run(caplog):
    calls = []
    stack = MiddlewareStack([Recorder("a", calls, fail=True), Recorder("b", calls)])
    with caplog.at_level(logging.CRITICAL, logger="pipeline.middleware"):
        stack.emit_before("before_process_batch", None, None)
    assert calls == [("before", "a"), ("before", "b")]
    [record] = caplog.records
    assert record.levelno == logging.CRITICAL and "Recorder.before_process_batch" in record.getMessage()
    assert record.exc_info[0] is RuntimeError


def test_hooks_default_to_no_ops():
    MiddlewareStack([Middleware()]).emit_after("after_ack", None, [], [])


def test_the_stack_knows_which_hooks_are_implemented():
    from pipeline.middleware import Middleware, MiddlewareStack

    class OnReceive(Middleware):
        def after_receive(self, worker, message):
            pass

    stack = MiddlewareStack([Middleware()])
    assert not stack.implements("after_receive")
    stack.add(OnReceive())
    assert stack.implements("after_receive") and not stack.implements("after_ack")
