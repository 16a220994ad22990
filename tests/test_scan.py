"""`lora-analysis scan`: discovery over mixed formats and broken files, rows against a float64
oracle, shards that add up to one run, resumption after a kill (every cut of the table, and a
real SIGKILL), refusals (unrelated files, outputs inside inputs), CSV / JSON Lines / Parquet."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_analysis import Adapter, LoraModule, save_adapter
from lora_analysis.scan import COLUMN_NAMES, ScanOutputError, Shard, find_adapters, scan_adapters
from lora_analysis.adapters.files import WEIGHTS_NAMES
from lora_analysis.scan.table import journal_path

ROOT = Path(__file__).resolve().parents[1]


def _modules(seed: int, count: int, r: int = 3, alpha: float | None = 6.0) -> dict[str, LoraModule]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.q_proj": LoraModule(torch.randn(r, 10, generator=g, dtype=torch.float64),
                                                             torch.randn(8, r, generator=g, dtype=torch.float64), alpha)
            for i in range(count)}


def make_tree(root: Path, extra_ours: int = 0) -> dict[str, dict]:
    """A tree of adapters in several formats plus unreadable files; {adapter name: what it is}."""
    expected: dict[str, dict] = {}
    save_adapter(Adapter(_modules(1, 3)), root / "runs" / "peft_dir")
    (root / "runs" / "peft_dir" / "training_args.bin").write_bytes(b"not an adapter, part of the directory")
    expected["runs/peft_dir"] = {"modules": 3, "format": "ours"}
    save_adapter(Adapter(_modules(2, 2)), root / "lone.safetensors")
    expected["lone.safetensors"] = {"modules": 2, "format": "ours"}
    g = torch.Generator().manual_seed(3)
    kohya = {}
    for i in range(2):
        kohya[f"lora_unet_block_{i}.lora_down.weight"] = torch.randn(4, 12, generator=g)
        kohya[f"lora_unet_block_{i}.lora_up.weight"] = torch.randn(6, 4, generator=g)
        kohya[f"lora_unet_block_{i}.alpha"] = torch.tensor(2.0)
    (root / "kohya").mkdir()
    save_file(kohya, str(root / "kohya" / "style.safetensors"))
    expected["kohya/style.safetensors"] = {"modules": 2, "format": "kohya"}
    torch.save({"encoder.0.lora_A": torch.randn(2, 9, generator=g), "encoder.0.lora_B": torch.randn(9, 2, generator=g)},
               root / "loralib.pt")
    expected["loralib.pt"] = {"modules": 1, "format": "loralib"}
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    expected["broken.safetensors"] = {"error": "truncated"}
    save_file({"model.embed.weight": torch.zeros(3, 3)}, str(root / "base_model.safetensors"))
    expected["base_model.safetensors"] = {"error": "unknown key layout"}
    (root / ".hidden").mkdir()
    save_adapter(Adapter(_modules(4, 1)), root / ".hidden" / "skipped.safetensors")
    (root / "notes.txt").write_text("not a tensor file")
    for i in range(extra_ours):
        save_adapter(Adapter(_modules(10 + i, 2)), root / "many" / f"a{i:03d}.safetensors")
        expected[f"many/a{i:03d}.safetensors"] = {"modules": 2, "format": "ours"}
    return expected


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "hub"
    root.mkdir()
    return root, make_tree(root)


def read_table(path: Path) -> list[dict]:
    """Rows of a scan table as {column: str or None} (one representation for every format)."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        assert rows[0] == COLUMN_NAMES
        return [{k: v or None for k, v in zip(COLUMN_NAMES, row)} for row in rows[1:]]
    if path.suffix == ".jsonl":
        records = [json.loads(line, parse_constant=_no_constants) for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    return [{k: None if r[k] is None else str(r[k]) for k in COLUMN_NAMES} for r in records]


def _no_constants(name):
    raise AssertionError(f"{name} in a JSON table")


def as_set(rows: list[dict]) -> list[tuple]:
    return sorted(tuple("" if v is None else v for v in r.values()) for r in rows)


def test_discovery_finds_files_and_adapter_directories(tree):
    root, expected = tree
    found = find_adapters(root)
    assert [a.name for a in found] == sorted(expected)  # hidden and non-tensor files skipped, dir files claimed
    assert find_adapters(root / "lone.safetensors")[0].name == "lone.safetensors"


def test_scan_mixed_formats_and_broken_files(tree, tmp_path):
    root, expected = tree
    out = tmp_path / "summary.csv"
    result = scan_adapters(root, out, progress=False)
    assert (result.found, result.scanned, result.failed, result.skipped) == (len(expected), len(expected), 2, 0)
    rows = read_table(out)
    by_adapter: dict[str, list[dict]] = {}
    for row in rows:
        by_adapter.setdefault(row["adapter"], []).append(row)
    assert sorted(by_adapter) == sorted(expected)
    for name, want in expected.items():
        block = by_adapter[name]
        if "error" in want:
            assert len(block) == 1 and block[0]["row"] == "error"
            assert want["error"] in block[0]["error"] and name in block[0]["error"] and "\n" not in block[0]["error"]
            continue
        assert [r["row"] for r in block] == ["module"] * want["modules"] + ["adapter"], name
        assert {r["format"] for r in block} == {want["format"]}
        assert int(block[-1]["modules"]) == want["modules"]
    loralib = by_adapter["loralib.pt"]
    assert loralib[0]["alpha"] is None and loralib[0]["scale"] is None  # unknown, not guessed
    assert "alpha unknown" in loralib[-1]["notes"]


def test_module_rows_match_a_float64_oracle(tree, tmp_path):
    """‖ΔW‖_F, σ₁ and the numerical rank of each module against the SVD of the materialized
    float64 ΔW = s·B·A (an oracle independent of the QR route)."""
    root, _ = tree
    out = tmp_path / "summary.jsonl"
    scan_adapters(root, out, progress=False)
    rows = {(r["adapter"], r["module"]): r for r in map(json.loads, out.read_text().splitlines()) if r["row"] == "module"}
    modules = _modules(1, 3)
    for name, m in modules.items():
        row = rows[("runs/peft_dir", name)]
        sigma = torch.linalg.svdvals(m.scale * m.B @ m.A)
        assert row["scale"] == m.scale == 2.0 and row["r"] == 3 and (row["d_out"], row["d_in"]) == (8, 10)
        assert row["sigma_max"] == pytest.approx(float(sigma[0]), rel=1e-12)
        assert row["frobenius_norm"] == pytest.approx(float(sigma.square().sum().sqrt()), rel=1e-12)
        assert row["stable_rank"] == pytest.approx(float(sigma.square().sum() / sigma[0] ** 2), rel=1e-12)
        assert row["numerical_rank"] == 3
    summary = next(r for r in map(json.loads, out.read_text().splitlines())
                   if r["adapter"] == "runs/peft_dir" and r["row"] == "adapter")
    total = sum(float(torch.linalg.matrix_norm(m.scale * m.B @ m.A)) ** 2 for m in modules.values())
    assert summary["frobenius_norm"] == pytest.approx(total**0.5, rel=1e-12)
    assert summary["parameters"] == 3 * 3 * (8 + 10)


FIXTURES = ROOT / "tests" / "fixtures" / "formats"
NEEDS_BASE = {  # fixture → what its error row must say: these updates cannot be analysed without the base model
    "lycoris_dora": "needs the base weight", "peft_dora": "needs the base weight", "torchtune_dora": "needs the base weight",
    "peft_target_parameters": "has LoRA on 2 parameters",
}
KOHYA_LAYOUT = {"lycoris_locon": "kohya", "lycoris_wrapper_lora": "kohya"}  # LyCORIS's plain LoRA is kohya's layout


def test_scan_reads_every_format_of_the_tool_written_fixtures(tmp_path):
    """Every fixture written by a tool's own code (tests/fixtures/formats), as a user keeps it:
    one adapter each, read by the format readers; its modules are those of expected.json.
    Updates that need the base model (DoRA, target_parameters on several parameters) are
    one-line error rows, and the scan goes on."""
    import yaml

    root = tmp_path / "formats"
    expected = {}
    for folder in sorted(p.parent for p in FIXTURES.glob("*/expected.json")):
        info = json.loads((folder / "expected.json").read_text())
        (root / folder.name).mkdir(parents=True)
        for name in [*info["adapter_files"], "adapter_config.json"]:
            if (folder / name).exists():
                (root / folder.name / name).write_bytes((folder / name).read_bytes())
        if "litgpt_config" in info:
            (root / folder.name / "model_config.yaml").write_text(yaml.safe_dump(info["litgpt_config"]))
        files = info["adapter_files"]
        is_directory = len(files) > 1 or (root / folder.name / "adapter_config.json").exists() or files[0] in WEIGHTS_NAMES
        expected[folder.name if is_directory else f"{folder.name}/{files[0]}"] = (folder.name, len(info["modules"]))
    out = tmp_path / "formats.csv"
    result = scan_adapters(root, out, progress=False)
    assert (result.found, result.failed) == (len(expected), len(NEEDS_BASE))
    blocks: dict[str, list[dict]] = {}
    for row in read_table(out):
        blocks.setdefault(row["adapter"], []).append(row)
    assert sorted(blocks) == sorted(expected)
    for name, (fixture, modules) in expected.items():
        block = blocks[name]
        if fixture in NEEDS_BASE:
            assert [r["row"] for r in block] == ["error"] and NEEDS_BASE[fixture] in block[0]["error"], block
            continue
        assert [r["row"] for r in block] == ["module"] * modules + ["adapter"], fixture
        assert {r["format"] for r in block} == {KOHYA_LAYOUT.get(fixture, fixture.split("_")[0])}, fixture


def test_shards_add_up_to_one_run(tree, tmp_path):
    root, expected = tree
    whole = tmp_path / "whole.jsonl"
    scan_adapters(root, whole, progress=False)
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}.jsonl"
        result = scan_adapters(root, part, shard=Shard.parse(f"{i}/3"), progress=False)
        assert result.found == len(expected)
        parts.append(read_table(part))
    names = [{r["adapter"] for r in part} for part in parts]
    assert sum(len(n) for n in names) == len(set().union(*names)) == len(expected)  # disjoint, covering
    assert as_set([r for part in parts for r in part]) == as_set(read_table(whole))


def test_shard_is_deterministic_and_validated():
    assert [Shard(1, 4).holds(f"adapter{i}") for i in range(50)] == [Shard.parse(" 1/4").holds(f"adapter{i}") for i in range(50)]
    counts = [sum(Shard(i, 4).holds(f"a/{n}.safetensors") for n in range(400)) for i in range(4)]
    assert sum(counts) == 400 and min(counts) > 60  # each name in exactly one shard, roughly even
    for bad in ("4/4", "1", "-1/2", "a/b", "1/0"):
        with pytest.raises(Exception, match="expected i/n"):
            Shard.parse(bad)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_from_every_cut_of_the_table(tree, tmp_path, suffix):
    """A write killed at any byte leaves a table that the next run completes: the same rows as
    one uninterrupted run, no adapter twice."""
    root, _ = tree
    whole = tmp_path / f"whole{suffix}"
    scan_adapters(root, whole, progress=False)
    data = whole.read_bytes()
    reference = as_set(read_table(whole))
    start = data.index(b"\n") + 1 if suffix == ".csv" else 0  # a CSV table is created with its header, whole
    cuts = sorted({start, len(data) - 1, *range(start, len(data), max(1, len(data) // 40))})
    for cut in cuts:
        out = tmp_path / f"cut{suffix}"
        out.write_bytes(data[:cut])
        result = scan_adapters(root, out, progress=False)
        assert as_set(read_table(out)) == reference, cut
        assert result.skipped + result.scanned == result.selected
    result = scan_adapters(root, whole, progress=False)
    assert result.scanned == 0 and whole.read_bytes() == data  # a finished table is left as it is


def test_resume_after_sigkill(tmp_path):
    """A real SIGKILL of the CLI mid-scan, then the same command: the table equals one run's."""
    root = tmp_path / "hub"
    root.mkdir()
    expected = make_tree(root, extra_ours=60)
    out = tmp_path / "summary.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lora_analysis", "scan", str(root), "-o", str(out), "--quiet"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # kill once some blocks are in
        if out.exists() and out.read_bytes().count(b"\n") > 6:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_table(out)
    finals = [r["adapter"] for r in rows if r["row"] in ("adapter", "error")]
    assert sorted(finals) == sorted(expected)  # every adapter once
    fresh = tmp_path / "fresh.csv"
    scan_adapters(root, fresh, progress=False)
    assert as_set(rows) == as_set(read_table(fresh))


def test_workers_give_the_same_table(tree, tmp_path):
    root, expected = tree
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    scan_adapters(root, one, progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "lora_analysis", "scan", str(root), "-o", str(two), "--workers", "2"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # stdout carries no output: the table is the file
    assert f"{len(expected)} adapter(s) scanned (2 unreadable)" in result.stderr and "scan: 100%" in result.stderr
    assert as_set(read_table(two)) == as_set(read_table(one))


def test_parquet_table_and_resume(tree, tmp_path):
    pytest.importorskip("pyarrow")
    root, expected = tree
    out = tmp_path / "summary.parquet"
    scan_adapters(root, out, shard=Shard(0, 2), progress=False)
    assert not journal_path(out).exists()
    first = read_table(out)
    result = scan_adapters(root, out, progress=False)  # the rest of the tree joins the same table
    assert result.skipped == len({r["adapter"] for r in first})
    whole = tmp_path / "whole.jsonl"
    scan_adapters(root, whole, progress=False)
    assert as_set(read_table(out)) == as_set(read_table(whole))
    import pyarrow.parquet as pq

    schema = pq.read_schema(out)
    assert str(schema.field("d_out").type) == "int64" and str(schema.field("sigma_max").type) == "double"


def test_parquet_journal_left_by_a_kill_is_merged_once(tree, tmp_path):
    pytest.importorskip("pyarrow")
    root, _ = tree
    out = tmp_path / "summary.parquet"
    scan_adapters(root, out, progress=False)
    reference = as_set(read_table(out))
    journal = journal_path(out)
    whole = tmp_path / "whole.jsonl"
    scan_adapters(root, whole, progress=False)
    data = whole.read_bytes()
    journal.write_bytes(data[: len(data) // 2])  # killed after the rename, before the journal's removal
    scan_adapters(root, out, progress=False)
    assert as_set(read_table(out)) == reference and not journal.exists()


def test_parquet_without_pyarrow_is_refused_in_one_line(tree, tmp_path, monkeypatch):
    root, _ = tree
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ScanOutputError, match=r"Parquet output needs pyarrow: pip install 'lora-analysis\[parquet\]'"):
        scan_adapters(root, tmp_path / "summary.parquet", progress=False)


@pytest.mark.parametrize("name, content", [
    ("summary.csv", b"name,score\nalice,3\n"),
    ("summary.jsonl", b'{"name": "alice"}\n{"name": "bob"}\n'),
    ("summary.csv", b"\xff\xfe binary"),
])
def test_an_unrelated_file_is_never_written_over(tree, tmp_path, name, content):
    root, _ = tree
    out = tmp_path / name
    out.write_bytes(content)
    with pytest.raises(ScanOutputError, match="is not a scan table"):
        scan_adapters(root, out, progress=False)
    assert out.read_bytes() == content


def test_an_unrelated_parquet_file_is_never_written_over(tree, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root, _ = tree
    out = tmp_path / "other.parquet"
    pq.write_table(pa.table({"name": ["alice"]}), out)
    before = out.read_bytes()
    with pytest.raises(ScanOutputError, match="is not a scan table"):
        scan_adapters(root, out, progress=False)
    assert out.read_bytes() == before and not journal_path(out).exists()


def test_outputs_never_go_into_inputs(tree, tmp_path):
    root, _ = tree
    inside = root / "runs" / "peft_dir" / "summary.csv"
    with pytest.raises(ScanOutputError, match="would write over the input adapter"):
        scan_adapters(root, inside, progress=False)
    assert not inside.exists()
    link = tmp_path / "link.csv"
    link.symlink_to(root / "lone.safetensors")
    before = (root / "lone.safetensors").read_bytes()
    with pytest.raises(ScanOutputError, match="would write over the input adapter"):
        scan_adapters(root, link, progress=False)
    assert (root / "lone.safetensors").read_bytes() == before
    with pytest.raises(ScanOutputError, match="unknown table format"):
        scan_adapters(root, tmp_path / "summary.txt", progress=False)
    with pytest.raises(ScanOutputError, match="does not exist"):
        scan_adapters(root, tmp_path / "missing" / "summary.csv", progress=False)


def test_a_second_scan_on_the_same_table_is_refused(tree, tmp_path):
    from lora_analysis.scan.table import open_table

    root, _ = tree
    out = tmp_path / "summary.csv"
    with open_table(out):
        with pytest.raises(ScanOutputError, match="another scan is writing this table"):
            scan_adapters(root, out, progress=False)


def test_cli_errors_are_one_line(tree, tmp_path):
    from lora_analysis.cli import main

    root, _ = tree
    assert main(["scan", str(root), "--shard", "3/3", "-o", str(tmp_path / "x.csv"), "--quiet"]) == 2
    assert main(["scan", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.csv"), "--quiet"]) == 2
    assert not (tmp_path / "x.csv").exists()
