"""The record store: complete lines only, torn tails skipped and cut, later records win."""

import json

from memplan.calibration import records


def test_append_then_read(tmp_path):
    f = tmp_path / "r.jsonl"
    records.append(f, {"key": "a", "status": "ok"})
    records.append(f, {"key": "b", "status": "oom"})
    assert records.read(f) == [{"key": "a", "status": "ok"}, {"key": "b", "status": "oom"}]
    assert f.read_text().count("\n") == 2  # one complete line per record


def test_torn_last_line_is_skipped_and_cut_before_the_next_append(tmp_path):
    f = tmp_path / "r.jsonl"
    records.append(f, {"key": "a"})
    with open(f, "ab") as fh:  # a kill in the middle of a write
        fh.write(b'{"key": "b", "stat')
    assert records.read(f) == [{"key": "a"}]
    records.append(f, {"key": "c"})
    lines = f.read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "c"]


def test_read_missing_file_is_empty(tmp_path):
    assert records.read(tmp_path / "none.jsonl") == []


def test_read_all_over_folders_later_record_wins(tmp_path):
    records.append(tmp_path / "a.jsonl", {"key": "k", "status": "error"})
    records.append(tmp_path / "b.jsonl", {"key": "k", "status": "ok"})
    records.append(tmp_path / "b.jsonl", {"config_key": "t", "tier": "trace"})
    got = records.read_all(tmp_path)
    assert [r.get("status") for r in got] == ["ok", None]


def test_write_atomic_replaces(tmp_path):
    from memplan.files import write_atomic

    f = tmp_path / "x.json"
    write_atomic(f, "one")
    write_atomic(f, "two")
    assert f.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
