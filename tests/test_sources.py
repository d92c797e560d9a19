"""Listing inputs: directories, globs, single files; stable ids; a clear error for a missing input."""

from __future__ import annotations

import pytest

from pipeline.sources import ListingConfig, clip_id_for, list_inputs


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
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_inputs(ListingConfig(str(tmp_path / "nope")))
