"""webdataset shard numbering and samples, on a local directory (no Ray)."""

import json

import fsspec
import pyarrow as pa

from k3batch.outputs import shards


def make(root, numbers):
    root.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        (root / f"{n:05d}.tar").write_bytes(f"tar {n}".encode())
        (root / f"{n:05d}.parquet").write_bytes(f"index {n}".encode())


def contents(root):
    return {p.name: p.read_text() for p in sorted(root.iterdir())}


def test_renumber_closes_gaps_keeping_tar_and_index_together(tmp_path):
    fs = fsspec.filesystem("file")
    make(tmp_path, [0, 2, 3, 7, 9])
    assert shards.next_number(fs, str(tmp_path)) == 10
    assert shards.renumber(fs, str(tmp_path), 5) == 5
    names = contents(tmp_path)
    assert sorted(names) == [f"{n:05d}.{e}" for n in range(5) for e in ("parquet", "tar")]
    for n in range(5):  # each tar still sits next to its own index
        assert names[f"{n:05d}.tar"].split()[1] == names[f"{n:05d}.parquet"].split()[1]
    assert shards.renumber(fs, str(tmp_path), 5) == 5 and contents(tmp_path) == names


def test_renumber_killed_half_way_finishes_from_its_manifest(tmp_path):
    fs = fsspec.filesystem("file")
    make(tmp_path, [0, 3, 4])  # moves: 3 -> 1, 4 -> 2
    (tmp_path / "_renumber.json").write_text(json.dumps([[3, 1], [4, 2]]))
    # Killed after moving 3's tar but not its index.
    (tmp_path / "00003.tar").rename(tmp_path / "00001.tar")
    assert shards.renumber(fs, str(tmp_path), 5) == 3
    names = contents(tmp_path)
    assert names == {
        "00000.parquet": "index 0",
        "00000.tar": "tar 0",
        "00001.parquet": "index 3",
        "00001.tar": "tar 3",
        "00002.parquet": "index 4",
        "00002.tar": "tar 4",
    }


def test_samples_hold_image_prompt_and_metadata_of_ok_rows_only():
    table = pa.table(
        {
            "id": ["a.1", "b"],
            "key": ["a_1-h0123456789abcdef", "b"],
            "prompt": ["a cat", None],
            "status": ["ok", "error"],
            "image_bytes": pa.array([b"\x89PNG", None], pa.binary()),
            "seed": pa.array([2**64 - 1, 1], pa.uint64()),
        }
    )
    samples = shards.samples(table, "png").to_pylist()
    assert len(samples) == 1
    s = samples[0]
    assert (s["__key__"], s["png"], s["txt"]) == ("a_1-h0123456789abcdef", b"\x89PNG", "a cat")
    assert json.loads(s["json"]) == {
        "id": "a.1",
        "key": "a_1-h0123456789abcdef",
        "prompt": "a cat",
        "status": "ok",
        "seed": 2**64 - 1,
    }


def test_shard_numbers_are_wide_enough_for_every_row():
    assert shards.digits(10) == 5 and shards.digits(99_999) == 5 and shards.digits(123_456) == 6
