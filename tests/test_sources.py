"""Listing inputs: directories, globs, single files; stable ids; a clear error for a missing input."""

from __future__ import annotations

import shutil

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.tagging import sources
from pipeline.tagging.sources import (AUDIO_EXTENSIONS, FILE_SCHEMA, InputError, ListingConfig, _extension, _row,
                                      clip_id_for, iter_inputs, list_inputs, walk_files)


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.wav").write_bytes(b"x" * 10)
    (tmp_path / "a" / "two.FLAC").write_bytes(b"y")
    (tmp_path / "notes.txt").write_text("not audio")
    (tmp_path / "take.raw").write_bytes(b"r" * 7)
    (tmp_path / "three.m4a").write_bytes(b"z" * 3)
    return tmp_path


def test_directory_is_searched_recursively_for_audio_extensions(tree):
    files = list_inputs(ListingConfig(str(tree))).to_pylist()
    assert [f["uri"].rsplit("/", 1)[-1] for f in files] == ["one.wav", "two.FLAC", "three.m4a"]
    assert [f["size_bytes"] for f in files] == [10, 1, 3]
    assert all(f["modified"].endswith("+00:00") for f in files)
    assert files[0]["clip_id"] == clip_id_for(files[0]["uri"]) and len(files[0]["clip_id"]) == 20


def test_glob_and_single_file_are_taken_as_given(tree):
    assert [f["uri"].rsplit("/", 1)[-1] for f in list_inputs(ListingConfig(str(tree / "**" / "*.wav"))).to_pylist()] == ["one.wav"]
    # a glob keeps what it matches whatever the extension ("take.raw" is no audio extension)
    assert [f["uri"].rsplit("/", 1)[-1] for f in list_inputs(ListingConfig(str(tree / "t*"))).to_pylist()] == [
        "take.raw", "three.m4a"]
    single = list_inputs(ListingConfig(str(tree / "take.raw"))).to_pylist()
    assert [(f["uri"], f["size_bytes"]) for f in single] == [(str(tree / "take.raw"), 7)]


def test_a_txt_csv_or_parquet_input_is_a_manifest_and_duplicates_count_once(tree):
    a, b = tree / "a" / "one.wav", tree / "three.m4a"
    (tree / "list.txt").write_text(f"# my files\n{a}\n\n{b}\n{a}\n  {b}  \n")
    files = list_inputs(ListingConfig(str(tree / "list.txt"))).to_pylist()
    assert [(f["uri"], f["size_bytes"]) for f in files] == [(str(a), 10), (str(b), 3)]
    (tree / "list.csv").write_text(f"uri,size_bytes,modified\n{b},3,2026-01-01\n{a},10,2026-01-02\n{b},3,2026-01-01\n")
    files = list_inputs(ListingConfig(str(tree / "list.csv"))).to_pylist()
    assert [(f["uri"], f["modified"]) for f in files] == [(str(b), "2026-01-01"), (str(a), "2026-01-02")]


def test_ids_are_stable_and_distinct():
    assert clip_id_for("s3://b/x.wav") == clip_id_for("s3://b/x.wav") != clip_id_for("s3://b/y.wav")


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        list_inputs(ListingConfig(str(tmp_path / "nope")))


# Chunked listing: `iter_inputs` yields what the listing always gave, a few rows at a time.

def _chunks(config: ListingConfig, chunk_rows: int = 3) -> list[dict]:
    chunks = list(iter_inputs(config, chunk_rows))
    assert all(0 < len(c) <= chunk_rows and c.schema == FILE_SCHEMA for c in chunks)
    return pa.concat_tables(chunks).to_pylist()


@pytest.fixture
def many(tmp_path):
    """Eight audio files; a manifest order naming some of them again in later chunks."""
    paths = []
    for i in range(8):
        path = tmp_path / "audio" / f"f{i}.wav"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * (i + 1))
        paths.append(str(path))
    order = [0, 1, 1, 2, 0, 3, 4, 2, 5, 6, 0, 7, 6]  # repeats within and across chunks of 3
    return tmp_path, paths, order


def test_a_txt_manifest_is_read_in_chunks_and_repeats_across_chunks_count_once(many):
    tmp_path, paths, order = many
    lines = []
    for n, i in enumerate(order):
        lines += [f"  {paths[i]} ", "", "# comment"] if n % 4 == 1 else [paths[i]]
    (tmp_path / "m.txt").write_text("\n".join(lines) + "\n")
    files = _chunks(ListingConfig(str(tmp_path / "m.txt")))
    assert [(f["uri"], f["size_bytes"]) for f in files] == [(p, i + 1) for i, p in enumerate(paths)]
    assert files == list_inputs(ListingConfig(str(tmp_path / "m.txt"))).to_pylist()
    assert [f["clip_id"] for f in files] == [clip_id_for(p) for p in paths]


def test_csv_and_parquet_manifests_are_read_in_chunks_and_repeats_across_chunks_count_once(many):
    tmp_path, paths, order = many
    rows = [{"uri": paths[i], "size_bytes": 100 + i, "modified": f"2026-01-0{1 + i % 9}", "etag": f"e{i}"}
            for i in order]
    rows.insert(5, {"uri": "   ", "size_bytes": 1, "modified": "x", "etag": None})  # a blank URI is no file
    rows[7]["uri"] = f" {rows[7]['uri']}  "  # white space around a URI is not part of it
    pacsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "m.csv")
    pq.write_table(pa.Table.from_pylist(rows).rename_columns(["path", "size_bytes", "modified", "etag"]),
                   tmp_path / "m.parquet", row_group_size=2)
    expected = [(p, 100 + i, f"2026-01-0{1 + i % 9}", f"e{i}") for i, p in enumerate(paths)]
    for name in ("m.csv", "m.parquet"):
        files = _chunks(ListingConfig(str(tmp_path / name)))
        assert [(f["uri"], f["size_bytes"], f["modified"], f["etag"]) for f in files] == expected, name
        assert [f["clip_id"] for f in files] == [clip_id_for(p) for p in paths]
        assert files == list_inputs(ListingConfig(str(tmp_path / name))).to_pylist()


def _find_rows(fs, root: str, extensions=AUDIO_EXTENSIONS) -> list[dict]:
    """The listing before it was streamed: fsspec's `find`, filtered and sorted by path."""
    infos = fs.find(root, detail=True)
    return [_row(fs, p, i) for p, i in sorted(infos.items()) if _extension(p) in extensions]


def _nested(put) -> None:
    """Names whose path order differs from a per-directory order that puts directories first or last."""
    for name in ("a.wav", "a/x.wav", "a/y/z.flac", "a-b.wav", "a0.mp3", "b/notes.txt", "b/c.wav", "c.ogg",
                 "a/y.wav", "d/e/f/g.wav"):
        put(name)


def test_a_directory_is_walked_in_chunks_in_path_order(tmp_path):
    def put(name):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"a" * len(name))
    _nested(put)
    fs = fsspec.filesystem("file")
    files = _chunks(ListingConfig(str(tmp_path)))
    assert files == _find_rows(fs, str(tmp_path)) and len(files) == 9


def test_another_fsspec_store_is_walked_in_chunks_in_path_order():
    fs = fsspec.filesystem("memory")
    _nested(lambda name: fs.pipe(f"/walk/{name}", b"m" * len(name)))
    files = _chunks(ListingConfig("memory://walk"))
    assert files == _find_rows(fs, "/walk") and len(files) == 9


def test_an_s3_prefix_is_paged_through_in_path_order(monkeypatch):
    from tests.s3 import MotoS3

    monkeypatch.setattr(sources, "S3_PAGE_KEYS", 2)  # several pages from a few keys
    with MotoS3() as moto:
        for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": moto.endpoint}.items():
            monkeypatch.setenv(k, v)
        fs = fsspec.filesystem("s3")
        fs.mkdir("bkt")
        _nested(lambda name: fs.pipe(f"bkt/in/{name}", b"s" * len(name)))
        fs.pipe("bkt/in-other/x.wav", b"not under the prefix")
        files = _chunks(ListingConfig("s3://bkt/in/"))
        assert files == _find_rows(fs, "bkt/in") and len(files) == 9
        assert files[0]["uri"] == "s3://bkt/in/a-b.wav" and files[0]["etag"] and files[0]["modified"]
        # walked directory by directory through fsspec (as other stores are), s3fs's listings cache
        # keeps nothing afterwards
        monkeypatch.setattr(sources, "_is_s3", lambda fs: False)
        fs.invalidate_cache()
        assert _chunks(ListingConfig("s3://bkt/in/")) == files
        assert not fs.dircache


def test_a_directory_that_cannot_be_listed_becomes_a_row_with_the_reason(tmp_path):
    for name in ("a.wav", "b/c.wav", "d.wav"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    def keep(path):  # the directory "b" disappears while the walk is under way
        if path.endswith("a.wav"):
            shutil.rmtree(tmp_path / "b")
        return True
    found = list(walk_files(fsspec.filesystem("file"), str(tmp_path), keep))
    assert [(p.rsplit("/", 1)[-1], i.get("listing_error")) for p, i in found] == [
        ("a.wav", None), ("b", "directory could not be listed (FileNotFoundError)"), ("d.wav", None)]


def test_manifest_times_are_kept_as_text_or_converted_to_utc_iso(tmp_path):
    import datetime as dt

    when = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
    pq.write_table(pa.table({"uri": ["/a.wav", "/b.wav"], "size_bytes": pa.array([1, 2], pa.int32()),
                             "modified": pa.array([when, None], pa.timestamp("ms", tz="UTC"))}), tmp_path / "t.parquet")
    files = _chunks(ListingConfig(str(tmp_path / "t.parquet")), 1)
    assert [(f["size_bytes"], f["modified"], f["etag"]) for f in files] == [
        (1, "2026-03-04T05:06:07+00:00", None), (2, None, None)]
    (tmp_path / "t.csv").write_text("uri,size_bytes,modified\n/a.wav,1,2026-03-04\n/b.wav,,\n")
    assert [(f["size_bytes"], f["modified"]) for f in _chunks(ListingConfig(str(tmp_path / "t.csv")))] == [
        (1, "2026-03-04"), (None, None)]
