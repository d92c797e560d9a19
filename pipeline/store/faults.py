"""A fault hook for the crash tests: SIGKILL this process when it reaches a named step.

`AUDIO_TAGGING_FAULT=STEP` (or `STEP@N`, the N-th time the step is reached) makes `point(STEP)` kill the
process at once, with no cleanup, as a preemption or OOM kill would. Unset (always, outside tests), a
call costs one dictionary lookup. The steps: lease-acquired (once a run holds OUTPUT), then per shard
parts-written, rewrites-written, segments-added, clips-committed, segments-cleaned (store/delta.py's
commit_shard), the same prefixed swap- in a settings replacement's swap, and summary-saved at the end.
"""

from __future__ import annotations

import collections
import logging
import os
import signal

ENV = "AUDIO_TAGGING_FAULT"
STEPS = ("lease-acquired", "parts-written", "rewrites-written", "segments-added", "clips-committed",
         "segments-cleaned", "swap-rewrites-written", "swap-segments-added", "swap-clips-committed",
         "swap-segments-cleaned", "summary-saved")

log = logging.getLogger(__name__)
_reached: collections.Counter = collections.Counter()


def point(step: str) -> None:
    """Kill this process (SIGKILL) if the fault hook names `step` and this is its N-th arrival."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name not in STEPS:
        raise ValueError(f"{ENV}={spec!r}: unknown step {name!r} (steps: {', '.join(STEPS)})")
    if name != step:
        return
    _reached[step] += 1
    if _reached[step] == int(nth or 1):
        log.warning("fault hook: killing this process at %s", spec)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
