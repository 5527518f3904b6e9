"""Processes a server starts: they must not outlive it."""
from __future__ import annotations

import signal


def die_with_parent() -> None:
    """In a child, before exec: SIGTERM it when its parent dies (even by SIGKILL), so nothing is orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to do
        pass
