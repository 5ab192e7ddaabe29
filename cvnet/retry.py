"""Transient failures: retried with exponential backoff, never recorded as bad inputs.

A failure is *permanent* when retrying cannot change it (undecodable bytes, a file the
filesystem confirms is absent, an image too small for the model): those become bad inputs. Any
other I/O error, a throttle, a timeout or a CUDA out-of-memory is *transient*: it is retried,
and when it persists the job fails naming the item (:class:`TransientError`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class TransientError(RuntimeError):
    """A transient failure that persisted through every retry; names the item."""


def retry_transient(fn: Callable[[], T], what: str, is_transient: Callable[[BaseException], bool],
                    attempts: int = 3, backoff_s: float = 0.5) -> T:
    """``fn()``, retried up to ``attempts`` more times (waits ``backoff_s * 2**i``) while it raises
    an error ``is_transient`` accepts; then :class:`TransientError` naming ``what``."""
    for attempt in range(attempts + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise TransientError(f"{what}: {type(err).__name__}: {err} (still failing after "
                                     f"{attempts} retries)") from err
            log.warning("%s: %s: %s; retry %d/%d", what, type(err).__name__, err, attempt + 1, attempts)
            time.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")
