"""Atomic writes (all or nothing, no temp file left behind, ordinary file permissions), strict
JSON reading, and safe names in messages."""

from __future__ import annotations

import os
import stat

import pytest

from lora_analysis.errors import AdapterFormatError, InputFileError, shown
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
