"""Exit statuses of the jobs, one per thing a scheduler can act on (README, "Exit status")."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any


class Exit(enum.IntEnum):
    OK = 0          # every listed file has its row and the run is committed
    BROKEN = 1      # committed, but plainly broken (all transient errors, or over --max-error-rate)
    USAGE = 2       # bad arguments (argparse's own status), or a model checkpoint that cannot be loaded
    OUTPUT = 3      # OUTPUT cannot be written or its tables disagree; earlier shards stay committed
    HELD = 4        # another run holds OUTPUT's lease (or this run lost it): retry later
    PLACEMENT = 5   # the cluster cannot hold the plan (resource named in the message)
    SETTINGS = 6    # the run's settings differ from the table's; --replace-settings to rebuild
    INPUT = 7       # the input cannot be listed: not found, a malformed manifest, or it lists nothing


def status_of(error: BaseException) -> Exit | None:
    """The exit status for an expected failure of a job, None for a bug (which should fail loudly)."""
    from pipeline.checkpoints import CheckpointError
    from pipeline.store.delta import LedgerError
    from pipeline.store.lease import LeaseError
    from pipeline.store.writer import OutputError
    from pipeline.store.settings import SettingsChanged
    from pipeline.tagging.resources import PlacementError
    from pipeline.tagging.sources import InputError

    for kind, status in ((LeaseError, Exit.HELD), (OutputError, Exit.OUTPUT), (LedgerError, Exit.OUTPUT),
                         (PlacementError, Exit.PLACEMENT), (SettingsChanged, Exit.SETTINGS), (InputError, Exit.INPUT),
                         (CheckpointError, Exit.USAGE)):
        if isinstance(error, kind):
            return status
    return None


def guarded(call: Callable[[], Any], log: logging.Logger) -> tuple[Exit | None, Any]:
    """(None, call()); for an expected failure (`status_of`), its status and None, logged in one line."""
    try:
        return None, call()
    except Exception as e:
        status = status_of(e)
        if status is None:
            raise
        log.error("%s", e)
        return status, None
