"""Atomic writes (all or nothing, no temp file left behind, ordinary file permissions), strict
JSON reading, and safe names in messages."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lora_analysis.errors import AdapterFormatError, InputFileError, LoraAnalysisError, shown
from lora_analysis.fileio import atomic_write, atomic_write_text, parse_json, read_json


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_interrupted_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_written_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.html", "<html/>")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644


# Strict JSON (fileio.parse_json) and safe names in messages (errors.shown) ----------------------

@pytest.mark.parametrize("text, reason", [
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    ('{"a": 1e400}', "out of float64 range"),
    ('{"a": ' + "1" + "0" * 400 + "}", "out of float64 range"),
    ('{"a": ' + str(2**1024) + "}", "out of float64 range"),
    ("[" * 100_000, "nested too deeply"),
    (b"\xff{}", "codec can't decode"),
    ("{", "Expecting"),
])
def test_parse_json_refuses_what_is_not_strict_finite_json(text, reason):
    with pytest.raises(AdapterFormatError, match=f"^cfg.json: corrupt config: not valid JSON .*{reason}"):
        parse_json(text, "cfg.json", "config", AdapterFormatError)


def test_parse_json_keeps_the_largest_finite_numbers():
    largest = 2**1024 - 2**971  # float64's max as an integer
    assert parse_json(f'[{largest}, 1.7976931348623157e308, -5, 0.5]', "f", "x") == [largest, 1.7976931348623157e308, -5, 0.5]


def test_read_json_names_a_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="missing.json: cannot read metrics"):
        read_json(tmp_path / "missing.json", "metrics")


def test_shown_escapes_control_characters_and_truncates():
    assert shown("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
    long = shown("k" * 10_000)
    assert len(long) < 200 and long.endswith("(9880 more characters)")


# Temp files this program owns, and directory locks ---------------------------------------------

def test_temp_files_carry_an_owned_name_and_only_dead_owners_files_are_removed(tmp_path):
    from lora_analysis.fileio import TEMP_SUFFIX, _host_tag, atomic_path, remove_stale_temp_files

    with atomic_path(tmp_path / "adapter.safetensors") as tmp:
        assert tmp.name.startswith(f".adapter.safetensors.{os.getpid()}@{_host_tag()}.") and tmp.name.endswith(TEMP_SUFFIX)
        tmp.write_text("in flight")
        assert remove_stale_temp_files(tmp_path) == []  # our own write in progress stays
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.json.{dead.stdout.strip()}@{_host_tag()}.abc_123{TEMP_SUFFIX}"
    elsewhere = tmp_path / f".x.json.{dead.stdout.strip()}@other-host.abc_123{TEMP_SUFFIX}"
    alive = tmp_path / f".x.json.{os.getppid()}@{_host_tag()}.abc_123{TEMP_SUFFIX}"
    users = [tmp_path / ".x.json.tmp", tmp_path / ".notes.tmp", tmp_path / f"x{TEMP_SUFFIX}"]
    for path in [stale, elsewhere, alive, *users]:
        path.write_text("")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [elsewhere, alive, *users, tmp_path / "adapter.safetensors"])


def test_a_locked_directory_refuses_a_second_holder_and_names_the_first(tmp_path):
    from lora_analysis.fileio import LOCK_NAME, DirectoryLockedError, lock_directory

    run = tmp_path / "run"
    with lock_directory(run, "training run"):
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(DirectoryLockedError, match=rf"^{re.escape(str(run))}: in use by another training run "
                                                        rf"\(pid {os.getpid()} on .*, started 20.*, command: .*\); wait for it"):
            with lock_directory(run):
                pass
        (run / "result.txt").write_text("kept")
    assert sorted(p.name for p in run.iterdir()) == ["result.txt"]  # the lock file goes with the lock
    with lock_directory(tmp_path / "made"):
        pass
    assert not (tmp_path / "made").exists()  # created for the lock and left empty: removed
    (tmp_path / "file").write_text("")
    with pytest.raises(InputFileError, match="exists and is not a directory"):
        with lock_directory(tmp_path / "file"):
            pass


def test_a_lock_dies_with_its_process_even_on_sigkill(tmp_path):
    from lora_analysis.fileio import LOCK_NAME, lock_directory

    code = ("import sys, time; from lora_analysis.fileio import lock_directory\n"
            "with lock_directory(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LoraAnalysisError, match=f"pid {holder.pid} "):
            with lock_directory(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert (tmp_path / LOCK_NAME).exists()  # left behind by the killed holder, but not locked
    with lock_directory(tmp_path):
        pass
