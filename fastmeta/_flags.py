"""A per-thread switch that a ``with`` block turns on (blocks nest; the previous state comes back)."""
from __future__ import annotations

import contextlib
import threading


class ThreadFlag:
    def __init__(self):
        self._local = threading.local()

    @property
    def on(self) -> bool:
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def enabled(self):
        old = self.on
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = old
