"""Stage 1, listing: find the input audio files with their size and modification time.

Runs on the driver through fsspec, so a local path, a glob, or an s3://, gs://, az:// or http(s)://
URI are listed the same way. A manifest (.parquet, .csv or .txt listing URIs, as dataset curators
keep them) names the files instead. Each file gets a stable `clip_id` derived from its URI.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import fsspec.asyn
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.tagging.keyset import KeySet

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


class InputError(ValueError):
    """The input cannot be listed as files to tag: not found, a malformed manifest, or nothing listed."""


def clip_id_for(uri: str) -> str:
    """Stable 80-bit id of a file: a hash of its URI, so reruns and changed files keep their id."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:20]


def list_inputs(config: ListingConfig) -> pa.Table:
    """All of `iter_inputs` as one table (for listings small enough to hold)."""
    return pa.concat_tables([FILE_SCHEMA.empty_table(), *iter_inputs(config)])


def iter_inputs(config: ListingConfig, chunk_rows: int = 100_000) -> Iterator[pa.Table]:
    """List input files as tables of FILE_SCHEMA of at most `chunk_rows` rows, in URI order (a
    manifest: in its order), each yielded as soon as it is complete.

    A directory is searched recursively for files with an audio extension; a glob or a single file is
    taken as given, whatever its extension (the decoder decides whether it is audio). Only one chunk
    of rows is held at a time, plus the entries of the directories being walked (a local walk or an
    fsspec store) or one page of 1,000 keys (S3: the prefix is paged through, flat or not); a
    manifest is read in chunks and remembers 16 bytes per URI to drop repeats. A glob is matched whole
    by fsspec before the first chunk.
    """
    fs, path = fsspec.core.url_to_fs(config.input)
    if _extension(path) in MANIFEST_EXTENSIONS and not fsspec.core.has_magic(path):
        yield from iter_manifest(config.input, chunk_rows)
        return
    if fsspec.core.has_magic(path):
        infos = fs.glob(path, detail=True)
        entries = iter(sorted((p, i) for p, i in infos.items() if i.get("type") != "directory"))
        del infos
    elif fs.isdir(path):
        entries = walk_files(fs, path, lambda p: _extension(p) in config.extensions)
    elif fs.exists(path):
        entries = iter([(path, fs.info(path))])
    else:
        raise InputError(f"input not found: {config.input}")
    listed = 0
    for rows in _batched((_row(fs, p, info) for p, info in entries), chunk_rows):
        listed += len(rows)
        yield pa.Table.from_pylist(rows, schema=FILE_SCHEMA)
    log.info("listed %d input files under %s", listed, config.input)


def walk_files(fs: fsspec.AbstractFileSystem, root: str, keep: Callable[[str], bool]) -> Iterator[tuple[str, dict]]:
    """(path, info) of the files under `root` whose path passes `keep`, in path order, as they are
    found. A directory that cannot be read becomes an entry with a `listing_error` instead of silently
    vanishing (fsspec's walk drops it). Symlinked directories are not followed, as in os.walk."""
    if _is_local(fs):
        return _walk_sorted(root, _ls_local, keep, _stat_local)
    if _is_s3(fs):
        return _walk_s3(fs, root, keep)
    return _walk_sorted(root, functools.partial(_ls_fsspec, fs), keep, lambda path, info: info)


def _walk_sorted(root: str, ls: Callable, keep: Callable[[str], bool], info_of: Callable) -> Iterator[tuple[str, dict]]:
    """Depth-first, each directory's entries sorted with a directory's name read as "name/": that is
    the order of the full paths, so the walk yields files in path order holding one listing per level."""
    stack = [iter([(root, None, True)])]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        path, info, is_dir = entry
        if not is_dir:
            if keep(path):
                yield path, info_of(path, info)
            continue
        try:
            entries = ls(path)
        except OSError as e:
            reason = ("permission denied listing directory" if isinstance(e, PermissionError)
                      else f"directory could not be listed ({type(e).__name__})")
            yield path, {"listing_error": reason}
            continue
        stack.append(iter(sorted(entries, key=lambda e: e[0] + "/" if e[2] else e[0])))


def _ls_local(directory: str) -> list[tuple[str, None, bool]]:
    with os.scandir(directory) as it:
        return [(f"{directory}/{e.name}", None, e.is_dir()) for e in it
                if not (e.is_symlink() and e.is_dir())]


def _stat_local(path: str, _info) -> dict:
    try:
        st = os.stat(path)
    except OSError:  # a broken link: the read fails later with the specific reason
        return {"size": None}
    return {"size": st.st_size, "mtime": st.st_mtime}


def _ls_fsspec(fs: fsspec.AbstractFileSystem, directory: str) -> list[tuple[str, dict, bool]]:
    try:
        infos = fs.ls(directory, detail=True)
    finally:  # listings caches (s3fs, gcsfs, adlfs) would otherwise keep the whole tree in memory
        fs.invalidate_cache(directory)
    return [(i["name"], i, i["type"] == "directory") for i in infos
            if i["name"].rstrip("/") != directory.rstrip("/") and not (i.get("islink") and i["type"] == "directory")]


S3_PAGE_KEYS = 1000  # ListObjectsV2's maximum


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    try:
        import s3fs
    except ImportError:
        return False
    return isinstance(fs, s3fs.S3FileSystem) and not fs.version_aware


def _walk_s3(fs, root: str, keep: Callable[[str], bool]) -> Iterator[tuple[str, dict]]:
    """Objects under an S3 prefix, one ListObjectsV2 page at a time without a delimiter (S3 returns
    keys in UTF-8 byte order, which is path order), through the filesystem's own client. s3fs's
    `find` would collect every page of the prefix first."""
    bucket, _, prefix = root.strip("/").partition("/")
    kwargs = {"Bucket": bucket, "Prefix": prefix + "/" if prefix else "", "MaxKeys": S3_PAGE_KEYS, **fs.req_kw}
    while True:
        page = fsspec.asyn.sync(fs.loop, fs.s3.list_objects_v2, **kwargs)
        for obj in page.get("Contents", []):
            path = f"{bucket}/{obj['Key']}"
            if not obj["Key"].endswith("/") and keep(path):
                yield path, {"size": obj["Size"], "LastModified": obj["LastModified"], "ETag": obj.get("ETag")}
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


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
    """All of `iter_manifest` as one table."""
    return pa.concat_tables([FILE_SCHEMA.empty_table(), *iter_manifest(manifest, threads=threads)])


def iter_manifest(manifest: str, chunk_rows: int = 100_000, threads: int = 32) -> Iterator[pa.Table]:
    """Files named by a manifest: a `uri` (or `path`) column in Parquet/CSV, or one URI per line; read
    and yielded in chunks of at most `chunk_rows` rows, in manifest order.

    Sizes and times come from the manifest when it has `size_bytes`/`modified`/`etag` columns, else from
    storage (in parallel). A listed file that cannot be found keeps its row, with no size, and becomes
    an error row ("file not found") instead of vanishing. A URI named again later is dropped (the first
    is kept): the URIs seen so far are remembered as 128-bit hashes (16 bytes each, keyset.KeySet).
    """
    seen, listed, named = KeySet(), 0, 0
    with ThreadPoolExecutor(threads) as pool:
        for table in _manifest_chunks(manifest, chunk_rows):
            first = _first_in_chunk(table.column("uri"))
            named += first.named
            keys = np.ascontiguousarray(first.digests[:, :16]).view("<u8")
            new = np.flatnonzero(~seen.contains(keys[:, 0], keys[:, 1]))
            seen.add(keys[new, 0], keys[new, 1])
            if {"size_bytes", "modified"} <= set(table.column_names):
                rows = _given_rows(table, first, new)
            else:
                uris = first.uris.take(pa.array(new)).to_pylist()
                rows = pa.Table.from_pylist(list(pool.map(_stat, uris)), schema=FILE_SCHEMA)
            listed += len(rows)
            if len(rows):
                yield rows
    if named > listed:
        log.warning("manifest %s names %d URIs more than once: each file is processed once", manifest, named - listed)
    log.info("manifest %s lists %d files", manifest, listed)


@dataclass(frozen=True)
class _FirstInChunk:
    named: int              # non-empty URIs in the chunk
    positions: np.ndarray   # rows of the first occurrence of each URI, in order
    uris: pa.Array          # those URIs, stripped
    digests: np.ndarray     # (n, 32) uint8: SHA-256 of each URI (clip_id is its first 80 bits, in hex)


def _first_in_chunk(column: pa.ChunkedArray) -> _FirstInChunk:
    """The first occurrence of each non-empty URI (stripped of white space) in one chunk, in order."""
    uris = pc.utf8_trim_whitespace(column)
    nonempty = pc.fill_null(pc.greater(pc.utf8_length(uris), 0), False)
    rows = pa.table({"uri": uris, "row": pa.array(np.arange(len(uris), dtype=np.int64))}).filter(nonempty)
    positions = np.sort(rows.group_by("uri", use_threads=False).aggregate([("row", "min")])
                        .column("row_min").to_numpy())
    uris = uris.take(pa.array(positions)).combine_chunks() if len(uris) else pa.array([], pa.string())
    digests = b"".join(hashlib.sha256(u).digest() for u in uris.cast(pa.binary()).to_pylist())
    return _FirstInChunk(len(rows), positions, uris, np.frombuffer(digests, dtype=np.uint8).reshape(-1, 32))


def _given_rows(table: pa.Table, first: _FirstInChunk, new: np.ndarray) -> pa.Table:
    """FILE_SCHEMA rows of the `new` first occurrences, with the sizes, times and etags the manifest
    gives (column by column: no Python object per value unless the times need converting)."""
    picked = table.take(pa.array(first.positions[new]))
    modified = picked.column("modified")
    if pa.types.is_string(modified.type) or pa.types.is_large_string(modified.type):
        modified = pc.if_else(pc.equal(modified, ""), pa.scalar(None, pa.string()), pc.cast(modified, pa.string()))
    else:  # timestamps or epoch seconds
        modified = pa.array([_modified({"mtime": v}) for v in modified.to_pylist()], pa.string())
    n = len(picked)
    etag = pc.cast(picked.column("etag"), pa.string()) if "etag" in picked.column_names else pa.nulls(n, pa.string())
    return pa.table({
        "clip_id": _hex_ids(first.digests[new]),
        "uri": first.uris.take(pa.array(new)),
        "size_bytes": pc.cast(picked.column("size_bytes"), pa.int64()),
        "modified": modified,
        "etag": etag,
        "listing_error": pa.nulls(n, pa.string())}, schema=FILE_SCHEMA)


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex_ids(digests: np.ndarray) -> pa.Array:
    """clip_id_for of each URI from its SHA-256 digest: the first 10 bytes in lower-case hex."""
    head = digests[:, :10]
    text = np.empty((len(head), 20), dtype=np.uint8)
    text[:, 0::2], text[:, 1::2] = _HEX[head >> 4], _HEX[head & 15]
    offsets = np.arange(0, 20 * len(head) + 1, 20, dtype=np.int32)
    return pa.StringArray.from_buffers(len(head), pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def _manifest_chunks(manifest: str, chunk_rows: int) -> Iterator[pa.Table]:
    """The manifest's rows in tables of at most `chunk_rows`, with a `uri` column (a `path` column is
    renamed), read as they are needed. InputError for a manifest that cannot be read as one."""
    try:
        yield from _manifest_tables(manifest, chunk_rows)
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise InputError(f"manifest {manifest} cannot be read: {e}") from e


def _manifest_tables(manifest: str, chunk_rows: int) -> Iterator[pa.Table]:
    ext = _extension(manifest)
    with fsspec.open(manifest, "rb") as f:
        if ext == "parquet":
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            columns = [c for c in ("uri", "path", "size_bytes", "modified", "etag") if c in names]
            batches = parquet.iter_batches(batch_size=chunk_rows, columns=columns)
        elif ext == "csv":
            types = {**{c: pa.string() for c in ("uri", "path", "modified", "etag")},  # not dates or numbers
                     "size_bytes": pa.int64()}  # fixed: a streaming reader infers types from its first block only
            reader = pacsv.open_csv(f, convert_options=pacsv.ConvertOptions(column_types=types))
            names = reader.schema.names
            batches = reader
        else:
            names, batches = ["uri"], _text_lines(f, chunk_rows)
        if "uri" not in names and "path" not in names:
            raise InputError(f"manifest {manifest} needs a 'uri' or 'path' column, has {names}")
        for table in _rebatched(batches, chunk_rows):
            if "uri" not in table.column_names:
                table = table.rename_columns(["uri" if c == "path" else c for c in table.column_names])
            yield table


def _text_lines(f, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """One URI per line; blank lines and lines starting with # are skipped."""
    for lines in _batched((s for s in (line.strip() for line in io.TextIOWrapper(f, encoding="utf-8"))
                           if s and not s.startswith("#")), chunk_rows):
        yield pa.record_batch({"uri": pa.array(lines, pa.string())})


def _rebatched(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly `rows` rows (the last one fewer) from record batches of any size."""
    pending, held = [], 0
    for batch in batches:
        pending.append(batch)
        held += len(batch)
        while held >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, held = rest.to_batches(), len(rest)
    if held:
        yield pa.Table.from_batches(pending)


def _stat(uri: str) -> dict:
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        info = fs.info(path)
    except OSError:  # not found, denied, ...: the read will fail with the specific reason
        return {"clip_id": clip_id_for(uri), "uri": uri, "size_bytes": None, "modified": None, "etag": None}
    row = _row(fs, path, info)
    return {**row, "uri": uri, "clip_id": clip_id_for(uri)}
