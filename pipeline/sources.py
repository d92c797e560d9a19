"""Stage 1, listing: find the input audio files with their size and modification time.

Runs on the driver through fsspec, so a local path, a glob, or an s3://, gs://, az:// or http(s)://
URI are listed the same way. A manifest (.parquet, .csv or .txt listing URIs, as dataset curators
keep them) names the files instead. Each file gets a stable `clip_id` derived from its URI.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = frozenset({"parquet", "csv", "txt"})
AUDIO_EXTENSIONS = frozenset({
    "wav", "wave", "flac", "mp3", "ogg", "oga", "opus", "m4a", "aac", "mp4", "wma", "aif", "aiff",
    "aifc", "au", "snd", "caf", "webm", "mka", "w64", "rf64",
})

FILE_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("uri", pa.string()), ("size_bytes", pa.int64()),
    ("modified", pa.string()), ("etag", pa.string()),
    ("listing_error", pa.string()),  # set on a row that stands for a directory that could not be listed
])


@dataclass(frozen=True)
class ListingConfig:
    """Where the inputs are and which file names count as audio (lower-case extensions, no dot)."""

    input: str
    extensions: frozenset[str] = AUDIO_EXTENSIONS


def clip_id_for(uri: str) -> str:
    """Stable 80-bit id of a file: a hash of its URI, so reruns and changed files keep their id."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:20]


def list_inputs(config: ListingConfig) -> pa.Table:
    """List input files as a table of FILE_SCHEMA, sorted by URI.

    A directory is searched recursively for files with an audio extension; a glob or a single file is
    taken as given, whatever its extension (the decoder decides whether it is audio).
    """
    fs, path = fsspec.core.url_to_fs(config.input)
    if _extension(path) in MANIFEST_EXTENSIONS and not fsspec.core.has_magic(path):
        return list_manifest(config.input)
    if fsspec.core.has_magic(path):
        infos = fs.glob(path, detail=True)
        infos = {p: i for p, i in infos.items() if i.get("type") != "directory"}
    elif fs.isdir(path):
        infos = _find_local(fs, path) if _is_local(fs) else fs.find(path, detail=True)
        infos = {p: i for p, i in infos.items() if "listing_error" in i or _extension(p) in config.extensions}
    elif fs.exists(path):
        infos = {path: fs.info(path)}
    else:
        raise FileNotFoundError(f"input not found: {config.input}")
    rows = [_row(fs, p, info) for p, info in sorted(infos.items())]
    log.info("listed %d input files under %s", len(rows), config.input)
    return pa.Table.from_pylist(rows, schema=FILE_SCHEMA)


def _find_local(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict]:
    """Files under a local directory, like `fs.find(detail=True)`, except that a directory that cannot
    be read becomes an entry with a `listing_error` instead of silently vanishing (fsspec's walk drops
    it). Symlinked directories are not followed, as in os.walk."""
    found, pending = {}, [root]
    while pending:
        directory = pending.pop()
        try:
            entries = fs.ls(directory, detail=True)
        except OSError as e:
            reason = ("permission denied listing directory" if isinstance(e, PermissionError)
                      else f"directory could not be listed ({type(e).__name__})")
            found[directory] = {"listing_error": reason}
            continue
        for info in entries:
            if info["type"] == "directory":
                if not info.get("islink"):
                    pending.append(info["name"])
            else:
                found[info["name"]] = info
    return found


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _row(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> dict:
    uri = path if _is_local(fs) else fs.unstrip_protocol(path)
    etag = info.get("ETag") or info.get("etag")
    return {
        "clip_id": clip_id_for(uri),
        "uri": uri,
        "size_bytes": info.get("size"),
        "modified": _modified(info),
        "etag": str(etag).strip('"') if etag else None,
        "listing_error": info.get("listing_error"),
    }


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _modified(info: dict) -> str | None:
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat()
    return str(value)


def list_manifest(manifest: str, threads: int = 32) -> pa.Table:
    """Files named by a manifest: a `uri` (or `path`) column in Parquet/CSV, or one URI per line.

    Sizes and times come from the manifest when it has `size_bytes`/`modified`/`etag` columns, else from
    storage (in parallel). A listed file that cannot be found keeps its row, with no size, and becomes
    an error row ("file not found") instead of vanishing.
    """
    table = _read_manifest(manifest)
    uris = [u.strip() if u else "" for u in table.column("uri").to_pylist()]
    given = {c: table.column(c).to_pylist() for c in ("size_bytes", "modified", "etag") if c in table.column_names}
    first = _first_occurrences(uris)
    if len(first) < sum(1 for u in uris if u):
        log.warning("manifest %s names %d URIs more than once: each file is processed once",
                    manifest, sum(1 for u in uris if u) - len(first))
    if given.keys() >= {"size_bytes", "modified"}:
        etags = given.get("etag", [None] * len(uris))
        rows = [{"clip_id": clip_id_for(uris[i]), "uri": uris[i], "size_bytes": given["size_bytes"][i],
                 "modified": _modified({"mtime": given["modified"][i]}), "etag": etags[i]} for i in first]
    else:
        with ThreadPoolExecutor(threads) as pool:
            rows = list(pool.map(_stat, [uris[i] for i in first]))
    log.info("manifest %s lists %d files", manifest, len(rows))
    return pa.Table.from_pylist(rows, schema=FILE_SCHEMA)


def _first_occurrences(uris: list[str]) -> list[int]:
    """Positions of the first occurrence of each non-empty URI, in manifest order."""
    seen: set[str] = set()
    keep = []
    for i, uri in enumerate(uris):
        if uri and uri not in seen:
            seen.add(uri)
            keep.append(i)
    return keep


def _read_manifest(manifest: str) -> pa.Table:
    ext = _extension(manifest)
    with fsspec.open(manifest, "rb") as f:
        if ext == "parquet":
            table = pq.read_table(f)
        elif ext == "csv":
            text = {c: pa.string() for c in ("uri", "path", "modified", "etag")}  # not dates or numbers
            table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types=text))
        else:
            lines = [line.strip() for line in f.read().decode("utf-8").splitlines()]
            table = pa.table({"uri": [line for line in lines if line and not line.startswith("#")]})
    if "uri" not in table.column_names and "path" in table.column_names:
        table = table.rename_columns(["uri" if c == "path" else c for c in table.column_names])
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {manifest} needs a 'uri' or 'path' column, has {table.column_names}")
    return table


def _stat(uri: str) -> dict:
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        info = fs.info(path)
    except OSError:  # not found, denied, ...: the read will fail with the specific reason
        return {"clip_id": clip_id_for(uri), "uri": uri, "size_bytes": None, "modified": None, "etag": None}
    row = _row(fs, path, info)
    return {**row, "uri": uri, "clip_id": clip_id_for(uri)}
