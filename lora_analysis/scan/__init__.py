"""Scan many adapters into one table: `lora-analysis scan ROOT -o summary.csv`.

- discover: `find_adapters` (files and adapter directories under a root), `Shard` (a
  deterministic 1/n of them, for job arrays).
- rows: the columns, and the rows of one adapter (`adapter_rows`, from its `analyze` report).
- table: the output table (.csv, .jsonl, .parquet), resumable and safe against kills.
- run: `scan_adapters`, on worker processes with one progress bar.
"""

from .discover import FoundAdapter, Shard, find_adapters
from .rows import COLUMN_NAMES, adapter_rows
from .run import ScanResult, scan_adapters
from .table import ScanOutputError

__all__ = ["COLUMN_NAMES", "FoundAdapter", "ScanOutputError", "ScanResult", "Shard", "adapter_rows",
           "find_adapters", "scan_adapters"]
