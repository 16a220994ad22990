"""`scan_adapters`: analyse every adapter under a root into one table, on N worker processes.

The parent process discovers the adapters, keeps those of its shard not yet in the table, hands
them one at a time to the workers (spawned processes: no fork of a process holding torch
threads), and is the table's only writer: a block per adapter, in the order they finish. A
worker that dies (killed, out of memory, a crash in native code) costs its adapter an error row
and is replaced; the scan goes on.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Iterator, Sequence, cast

from tqdm.auto import tqdm

from ..errors import LoraAnalysisError
from .discover import FoundAdapter, Shard, find_adapters
from .rows import Row, adapter_rows, error_row
from .table import check_output, open_table


@dataclass(frozen=True)
class ScanResult:
    """found: adapters under the root; selected: those of this shard; skipped: already in the
    table; scanned: written by this run, of which failed as error rows."""

    found: int
    selected: int
    skipped: int
    scanned: int
    failed: int


def scan_adapters(
    root: str | os.PathLike,
    output: str | os.PathLike,
    *,
    workers: int = 1,
    shard: Shard = Shard(),
    device: str = "auto",
    progress: bool = True,
) -> ScanResult:
    """Analyse the adapters under `root` (`find_adapters`) that belong to `shard` into the table
    `output` (.csv, .jsonl or .parquet; see `table`), skipping those already in it.

    workers: processes analysing adapters side by side (1: this process), each with an equal
    share of torch's threads. A progress bar counts adapters on stderr unless progress=False.
    """
    if workers < 1:
        raise LoraAnalysisError(f"workers must be >= 1, got {workers}")
    found = find_adapters(root)
    output = Path(output)
    check_output(output, found)
    selected = [a for a in found if shard.holds(a.name)]
    with open_table(output) as table:
        todo = [a for a in selected if a.name not in table.done]
        scanned = failed = 0
        with tqdm(total=len(selected), initial=len(selected) - len(todo), desc="scan", unit="adapter",
                  disable=not progress) as bar:
            for rows in _analyzed(todo, workers, device):
                table.append(rows)
                scanned += 1
                failed += rows[-1]["row"] == "error"
                bar.update()
    return ScanResult(len(found), len(selected), len(selected) - len(todo), scanned, failed)


def _analyzed(adapters: Sequence[FoundAdapter], workers: int, device: str) -> Iterator[list[Row]]:
    if workers == 1 or len(adapters) <= 1:
        for adapter in adapters:
            yield adapter_rows(adapter, device)
        return
    yield from _WorkerPool(min(workers, len(adapters)), device).run(adapters)


class _WorkerPool:
    """Spawned worker processes, each analysing one adapter at a time (`_worker`)."""

    def __init__(self, size: int, device: str):
        import torch

        self.size, self.device = size, device
        self.threads = max(1, torch.get_num_threads() // size)
        self.context = multiprocessing.get_context("spawn")

    def run(self, adapters: Sequence[FoundAdapter]) -> Iterator[list[Row]]:
        queue = deque(adapters)
        busy: dict[Connection, tuple[multiprocessing.process.BaseProcess, FoundAdapter]] = {}
        try:
            while queue or busy:
                while queue and len(busy) < self.size:
                    process, connection = self._start()
                    busy[connection] = (process, queue[0])
                    connection.send(queue.popleft())
                for ready in wait(list(busy)):
                    connection = cast(Connection, ready)
                    process, adapter = busy.pop(connection)
                    try:
                        rows = connection.recv()
                    except (EOFError, OSError):  # the worker died with this adapter
                        process.join()
                        connection.close()
                        yield [error_row(adapter.name, _death(process.exitcode))]
                        continue
                    yield rows
                    if queue:
                        busy[connection] = (process, queue[0])
                        connection.send(queue.popleft())
                    else:
                        _stop(process, connection)
        finally:
            for connection, (process, _) in busy.items():
                _stop(process, connection)

    def _start(self) -> tuple[multiprocessing.process.BaseProcess, Connection]:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker, args=(child, self.device, self.threads), daemon=True)
        process.start()
        child.close()
        return process, parent


def _worker(connection: Connection, device: str, threads: int) -> None:
    """Analyse the adapters sent over `connection` until None arrives, answering with rows."""
    import torch

    torch.set_num_threads(threads)
    while True:
        adapter = connection.recv()
        if adapter is None:
            return
        connection.send(adapter_rows(adapter, device))


def _stop(process: multiprocessing.process.BaseProcess, connection: Connection) -> None:
    try:
        connection.send(None)
    except OSError:
        pass
    process.join(timeout=10)
    if process.is_alive():
        process.terminate()
        process.join()
    connection.close()


def _death(exitcode: int | None) -> str:
    how = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    hint = " (SIGKILL: out of memory?)" if exitcode == -9 else ""
    return f"the analysis process died ({how}){hint} while reading this adapter"
