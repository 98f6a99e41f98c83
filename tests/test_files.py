"""Output files are written to the path asked: atomically for regular files, through devices, FIFOs and links."""

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from memplan.calibration import records
from memplan.errors import MemplanError
from memplan.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_regular_file_is_replaced_keeping_its_mode_and_no_temp_left(tmp_path):
    f = tmp_path / "out.xml"
    write_atomic(f, b"one")
    f.chmod(0o600)
    write_atomic(f, "two")
    assert f.read_bytes() == b"two"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["out.xml"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    f = tmp_path / "out.xml"
    f.write_bytes(b"old")

    def boom(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(MemplanError, match=r"out.xml: cannot write \(No space left on device\)"):
        write_atomic(f, b"new")
    assert f.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.xml"]


def test_symlink_stays_a_link_and_its_target_is_written(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "report.xml"
    target.write_bytes(b"old")
    link = tmp_path / "link.xml"
    link.symlink_to(target)
    write_atomic(link, b"new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.xml", "real"]  # no temp beside the link


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.xml"
    link.symlink_to(tmp_path / "new.xml")
    write_atomic(link, b"x")
    assert link.is_symlink() and (tmp_path / "new.xml").read_bytes() == b"x"


def test_fifo_is_written_through(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(Path(fifo).read_bytes()), daemon=True)
    reader.start()
    write_atomic(fifo, b"through the pipe")
    reader.join(10)
    assert not reader.is_alive() and got == [b"through the pipe"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_dev_null_stays_a_character_device(tmp_path):
    # As root a regression would replace the machine's /dev/null: root writes to a private copy.
    device = Path("/dev/null")
    if os.geteuid() == 0:
        device = tmp_path / "null"
        try:
            os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError as e:
            pytest.skip(f"cannot make a private null device to test safely as root ({e})")
    write_atomic(device, b"nothing")
    assert stat.S_ISCHR(os.lstat(device).st_mode)


@pytest.mark.parametrize("path, match", [
    ("", "output path: empty path"),
])
def test_empty_path(path, match):
    with pytest.raises(MemplanError, match=match):
        write_atomic(path, b"x")


def test_missing_parent_is_an_error_not_created(tmp_path):
    with pytest.raises(MemplanError, match=r"no/such/r.xml: no such folder"):
        write_atomic(tmp_path / "no" / "such" / "r.xml", b"x")
    assert not (tmp_path / "no").exists()


def test_directory_target(tmp_path):
    with pytest.raises(MemplanError, match=r"--junit .*: is a directory"):
        write_atomic(tmp_path, b"x", label=f"--junit {tmp_path}")
    assert tmp_path.is_dir()


def test_records_append_does_not_create_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        records.append(tmp_path / "no" / "r.jsonl", {"key": "a"})
    assert not (tmp_path / "no").exists()


def _memplan(*args, cwd):
    return subprocess.run([sys.executable, "-m", "memplan", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_check_junit_through_a_symlink_keeps_it(tmp_path):
    target = tmp_path / "reports" / "memplan.xml"
    target.parent.mkdir()
    link = tmp_path / "out.xml"
    link.symlink_to(target)
    done = _memplan("check", str(ROOT / "examples/plans/h100.yaml"), "--junit", str(link), "--json", cwd=tmp_path)
    assert done.returncode in (0, 1), done.stderr
    assert link.is_symlink() and target.read_bytes().startswith(b"<?xml")


def test_check_junit_to_stdout_and_a_process_substitution(tmp_path):
    plan = ROOT / "examples/plans/h100.yaml"
    # The process's own stdout through /proc (as /dev/stdout leads): a regression that replaced the
    # target instead of writing through it fails here without touching the machine's /dev.
    done = subprocess.run(["bash", "-c", f'"{sys.executable}" -m memplan check "{plan}" --json --junit /proc/self/fd/1 '
                           '>/dev/null; echo "rc=$?"; '
                           f'"{sys.executable}" -m memplan check "{plan}" --json --junit >(wc -c > "{tmp_path}/n") '
                           '>/dev/null; echo "rc=$?"; wait; sleep 0.5'],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.stdout.split() in (["rc=0", "rc=0"], ["rc=1", "rc=1"]), done.stderr
    assert int((tmp_path / "n").read_text()) > 100  # the XML went through the pipe


def test_check_junit_empty_path_is_one_line(tmp_path):
    done = _memplan("check", str(ROOT / "examples/plans/h100.yaml"), "--junit", "", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("memplan: error: --junit") and "the path is empty" in done.stderr


def test_units_and_one_line():
    from memplan.errors import one_line
    from memplan.units import GIB, MIB, fmt_gib, fmt_size, gib

    assert (GIB, MIB, gib(3 * GIB)) == (2**30, 2**20, 3.0)
    assert (fmt_gib(None), fmt_gib(GIB + GIB // 2), fmt_gib(GIB, unit=True)) == ("-", "1.50", "1.00 GiB")
    assert (fmt_size(2 * GIB), fmt_size(3 * MIB), fmt_size(None)) == ("2.00 GiB", "3.00 MiB", "-")
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError("x" * 900), limit=500, with_type=True) == ("RuntimeError: " + "x" * 900)[:500]
