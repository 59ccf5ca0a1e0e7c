"""Worker-process setup shared by the steps that fan per-file work out to processes."""

from __future__ import annotations

import os
import sys

from threadpoolctl import threadpool_limits


def use_single_thread() -> None:
    """Limit this process to one compute thread (OpenMP, BLAS, and torch if it is loaded).

    N single-threaded workers then use N cores without oversubscription, which on a
    small machine makes the difference between scaling and slowing down.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    threadpool_limits(1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
