"""Settings pinned per OUTPUT: a run whose settings differ from the table's is refused, naming what
differs, unless it asks to replace the table (`--replace-settings`)."""

from __future__ import annotations

import json
import logging

from pipeline.store.delta import Settings

log = logging.getLogger(__name__)


class SettingsChanged(ValueError):
    """The run's settings differ from those of the table it would extend, and no replacement was asked for."""


def check_settings(output: str, table: dict | None, table_hash: str | None, settings: Settings,
                   replace: bool) -> bool:
    """Whether this run replaces the table (True) or extends it (False); SettingsChanged if its settings
    differ from the table's and `replace` was not asked for."""
    if table_hash is None or table_hash == settings.hash:
        return False
    if replace:
        log.info("settings differ from the table's (%s): --replace-settings: reprocessing every file into a new "
                 "table, swapped in when the run ends", ", ".join(_differing(table, settings.values)))
        return True
    raise SettingsChanged(
        f"{output} holds results made with other settings (hash {table_hash}, this run {settings.hash}); "
        f"they differ in: {', '.join(_differing(table, settings.values))}. Rerun with the table's settings, or "
        "pass --replace-settings to reprocess every file with these and swap the new table in at the end "
        "(earlier results stay readable by Delta time travel until vacuumed)")


def _differing(old: dict | None, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two settings dicts."""
    if old is None:
        return ["(unknown: the table was made by an older version)"]
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key} ({json.dumps(a)[:60]} -> {json.dumps(b)[:60]})")
    return keys
