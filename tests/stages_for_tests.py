"""Stage handlers used only by tests."""
from __future__ import annotations

from consumers.primes import classify


def fail_on_13(batch):
    """Classify like primes, but raise for any batch holding the number 13."""
    if any(r.get("number") == 13 for r in batch.records):
        raise ValueError("unlucky 13")
    return classify(batch)
