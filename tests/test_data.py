"""Data loading: file formats, errors with file and line, the split, batching."""

from __future__ import annotations

import bz2
import json
import re

import numpy as np
import pytest
import torch

from lora_analysis.errors import LoraAnalysisError
from lora_analysis.training.data import ShuffledStream, collate, load_dataset, split_dataset


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_custom_columns_quotes_and_multiline_text(tmp_path):
    path = write(tmp_path / "r.csv", 'id,review,stars\n1,"great, really",pos\n2,"two\nlines",neg\n\n3,meh,neg\n')
    data = load_dataset(path, text_column="review", label_column="stars")
    assert data.texts == ["great, really", "two\nlines", "meh"]
    assert data.label_names == ["neg", "pos"]
    assert data.labels == [1, 0, 0]


def test_tsv_jsonl_and_compressed_files(tmp_path):
    tsv = write(tmp_path / "d.tsv", "text\tlabel\nhello there\t1\nbye now\t0\n")
    assert load_dataset(tsv).labels == [1, 0]
    jsonl = write(tmp_path / "d.jsonl", '{"text": "a b", "label": 2}\n\n{"text": "c", "label": 10}\n')
    data = load_dataset(jsonl)
    assert data.label_names == ["2", "10"]  # integer labels sort numerically
    assert data.labels == [0, 1]
    packed = tmp_path / "d.csv.bz2"
    packed.write_bytes(bz2.compress(b"text,label\nx,a\ny,b\n"))
    assert load_dataset(packed).texts == ["x", "y"]


def test_explicit_labels_fix_class_ids_and_reject_unknown_labels(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\nx,pos\ny,neg\nz,maybe\n")
    with pytest.raises(LoraAnalysisError, match=r"d\.csv:4: unknown label 'maybe'"):
        load_dataset(path, labels=["neg", "pos"])
    assert load_dataset(path, labels=["pos", "neg", "maybe"]).labels == [0, 1, 2]
    assert load_dataset(path, skip_labels=("maybe",)).texts == ["x", "y"]


def test_text_file_for_causal_lm(tmp_path):
    path = write(tmp_path / "c.txt", "first line\n\n  \nsecond line\n")
    data = load_dataset(path, task="causal-lm")
    assert data.texts == ["first line", "second line"] and data.labels is None
    with pytest.raises(LoraAnalysisError, match="plain text file has no labels"):
        load_dataset(path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("short.csv", "text,label\nok,a\nonly one field\nx,b\n", r"short\.csv:3: expected 2 fields, got 1"),
        ("quote.csv", 'text,label\nok,a\n"bad"x,b\n', r"quote\.csv:3: malformed CSV"),
        ("cols.csv", "review,label\nok,a\n", r"cols\.csv:1: missing column\(s\) \['text'\]"),
        ("empty.csv", "", r"empty\.csv: empty file"),
        ("blank.csv", "text,label\nok,a\n ,b\n", r"blank\.csv:3: empty text"),
        ("nolabel.tsv", "text\tlabel\nok\ta\nfine\t\n", r"nolabel\.tsv:3: empty label"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', r"bad\.jsonl:2: corrupt JSONL record: not valid JSON"),
        ("list.jsonl", '[1, 2]\n', r"list\.jsonl:1: expected a JSON object"),
        ("field.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b"}\n', r"field\.jsonl:3: missing field\(s\) \['label'\]"),
        ("one.csv", "text,label\nx,a\ny,a\n", r"one\.csv: classification needs at least 2 labels"),
        ("data.parquet", "x", r"data\.parquet: unknown data file type"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, content, message):
    with pytest.raises(LoraAnalysisError, match=message):
        load_dataset(write(tmp_path / name, content))


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(LoraAnalysisError, match="no such data file .*built-in data sets: rotten_tomatoes"):
        load_dataset(tmp_path / "nope.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,a\nx,b\n".encode("latin-1"))
    with pytest.raises(LoraAnalysisError, match=r"latin\.csv: not UTF-8"):
        load_dataset(latin)


def test_split_is_deterministic_sized_and_keeps_duplicates_together(tmp_path):
    rows = [f"text number {i},{'ab'[i % 2]}" for i in range(100)]
    rows += ["Same  Text,a", "same text,a", "same text ,b"]  # one text up to case and whitespace
    data = load_dataset(write(tmp_path / "d.csv", "text,label\n" + "\n".join(rows) + "\n"))
    train, val = split_dataset(data, val_fraction=0.2, seed=3)
    again_train, again_val = split_dataset(data, val_fraction=0.2, seed=3)
    assert (train.texts, val.texts) == (again_train.texts, again_val.texts)
    assert 21 <= len(val) <= 23 and len(train) + len(val) == len(data)
    key = lambda t: " ".join(t.lower().split())  # noqa: E731
    assert not {key(t) for t in train.texts} & {key(t) for t in val.texts}
    dup_side = [key(t) == "same text" for t in val.texts].count(True)
    assert dup_side in (0, 3)
    other_train, _ = split_dataset(data, val_fraction=0.2, seed=4)
    assert other_train.texts != train.texts
    for seed in range(20):  # the duplicate group never straddles, whatever the seed
        t, v = split_dataset(data, 0.2, seed)
        assert [key(x) for x in t.texts].count("same text") in (0, 3)


def test_split_rejects_bad_fractions_and_tiny_sets(tmp_path):
    data = load_dataset(write(tmp_path / "d.csv", "text,label\nx,a\nx,b\n"))
    with pytest.raises(LoraAnalysisError, match="2 examples are too few to split"):
        split_dataset(data, 0.5)
    with pytest.raises(LoraAnalysisError, match=r"validation fraction must be in \[0, 1\)"):
        split_dataset(data, 1.0)


def test_shuffled_stream_is_a_pure_function_of_seed_and_step():
    stream = ShuffledStream(10, seed=7)
    epoch = [i for step in range(5) for i in stream.batch(step, 2)]
    assert sorted(epoch) == list(range(10))  # each epoch is a permutation
    assert ShuffledStream(10, seed=7).batch(3, 2) == stream.batch(3, 2)
    assert stream.batch(7, 2) == ShuffledStream(10, seed=7).batch(7, 2)  # random access = resume
    # DDP: rank slices of one step tile the single-process batch of size batch·world.
    assert stream.batch(4, 2, rank=0, world_size=2) + stream.batch(4, 2, rank=1, world_size=2) == stream.batch(4, 4)


def test_collate_pads_and_masks():
    batch = collate([[5, 6, 7], [8]], pad_id=0, labels=[1, 0])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    lm = collate([[5, 6, 7], [8]], pad_id=0)
    assert torch.equal(lm["labels"], torch.tensor([[5, 6, 7], [8, -100, -100]]))


@pytest.mark.integration
def test_builtin_data_sets():
    rt = load_dataset("rotten_tomatoes")
    assert len(rt) == 12808 and rt.label_names == ["rotten", "fresh"]
    assert rt.labels.count(1) == 7403 and rt.labels.count(0) == 5405
    sms = load_dataset("sms_spam")
    assert sms.label_names == ["ham", "spam"] and len(sms) == 4837 and sms.labels.count(1) == 638
    trec = load_dataset("trec")
    assert trec.num_labels == 6 and len(trec) == 15452
    assert trec.texts[0] == "How did serfdom develop in and then leave Russia ?" and trec.label_names[trec.labels[0]] == "description"
    train, val = split_dataset(trec, 0.1, 0)  # the TREC file repeats questions: none may leak
    assert not set(train.texts) & set(val.texts)


def test_jsonl_label_must_be_scalar(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps({"text": "a", "label": [1]}) + "\n")
    with pytest.raises(LoraAnalysisError, match=r"d\.jsonl:1: text must be a string"):
        load_dataset(path)


def test_length_grouped_stream_covers_every_example_once_per_epoch_with_less_padding():
    from lora_analysis.training.data import ShuffledStream

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 64, size=1000)
    plain = ShuffledStream(1000, seed=3)
    grouped = ShuffledStream(1000, seed=3, lengths=lengths, global_batch=16)
    steps = 1000 // 16
    for stream in (plain, grouped):
        seen = [i for step in range(steps) for i in stream.batch(step, 16)]
        assert len(set(seen)) == len(seen) == steps * 16  # no repeats within the epoch

    def padded(stream):
        return sum(max(lengths[stream.batch(step, 16)]) * 16 for step in range(steps))

    assert padded(grouped) < 0.75 * padded(plain)
    # a pure function of (seed, step): a fresh stream (a resumed run) gives the same batches
    again = ShuffledStream(1000, seed=3, lengths=lengths, global_batch=16)
    assert [again.batch(s, 16) for s in (40, 3, 61)] == [grouped.batch(s, 16) for s in (40, 3, 61)]
    # batch order is shuffled, not sorted by length
    maxima = [max(lengths[grouped.batch(step, 16)]) for step in range(steps)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_length_grouped_ranks_split_the_single_process_batch():
    from lora_analysis.training.data import ShuffledStream

    lengths = np.random.default_rng(1).integers(5, 64, size=500)
    single = ShuffledStream(500, seed=0, lengths=lengths, global_batch=8)
    ddp = ShuffledStream(500, seed=0, lengths=lengths, global_batch=4 * 2)
    for step in range(70):  # crosses an epoch boundary
        assert ddp.batch(step, 4, 0, 2) + ddp.batch(step, 4, 1, 2) == single.batch(step, 8)


@pytest.mark.parametrize("content, first, second", [
    ("text,label\na,1\nb,0\nc,1.0\n", "'1' (line 2)", "'1.0' (line 4)"),
    ("text,label\na,01\nb,1\n", "'01' (line 2)", "'1' (line 3)"),
    ("text,label\na,2\nb,2e0\n", "'2' (line 2)", "'2e0' (line 3)"),
])
def test_one_number_spelled_two_ways_is_refused_not_split_into_two_classes(tmp_path, content, first, second):
    expected = re.escape(f"d.csv: labels {first} and {second} are the same number spelled differently")
    with pytest.raises(LoraAnalysisError, match=expected):
        load_dataset(write(tmp_path / "d.csv", content))


def test_label_spellings_rule_covers_jsonl_numbers_and_given_labels(tmp_path):
    jsonl = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": 1.0}\n')
    with pytest.raises(LoraAnalysisError, match=r"labels '1' \(line 1\) and '1\.0' \(line 3\)"):
        load_dataset(jsonl)
    csv_path = write(tmp_path / "d.csv", "text,label\na,1.0\nb,0.0\n")
    with pytest.raises(LoraAnalysisError, match=r"labels '1' \(--labels\) and '1\.0' \(line 2\)"):
        load_dataset(csv_path, labels=["0", "1"])
    assert load_dataset(csv_path).label_names == ["0.0", "1.0"]  # one spelling each: fine
    strings = write(tmp_path / "s.jsonl", '{"text": "a", "label": "1"}\n{"text": "b", "label": 2}\n')
    assert load_dataset(strings).label_names == ["1", "2"]  # "1" and 1 are spelled alike


def test_a_null_label_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n')
    with pytest.raises(LoraAnalysisError, match=r"d\.jsonl:2: label 'label' is null"):
        load_dataset(path)


def test_a_jsonl_record_with_nan_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": NaN}\n')
    with pytest.raises(LoraAnalysisError, match=r"d\.jsonl:1: corrupt JSONL record: not valid JSON \(NaN is not a JSON number\)"):
        load_dataset(path)


def _compressed(suffix: str, data: bytes) -> bytes:
    import gzip
    import lzma

    return {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}[suffix](data)


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".bz2"])
@pytest.mark.parametrize("damage", ["flipped", "truncated", "garbage"])
def test_corrupt_compressed_files_are_refused_naming_the_file(tmp_path, suffix, damage):
    rows = "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(400)).encode()
    packed = bytearray(_compressed(suffix, b"text,label\n" + rows))
    if damage == "flipped":
        for i in range(len(packed) // 3, len(packed) // 3 + 16):
            packed[i] ^= 0xFF
    elif damage == "truncated":
        packed = packed[: len(packed) // 2]
    else:
        packed = bytearray(b"not compressed at all" * 10)
    path = tmp_path / f"d.csv{suffix}"
    path.write_bytes(bytes(packed))
    with pytest.raises(LoraAnalysisError, match=rf"^{re.escape(str(path))}(:\d+)?: "):
        load_dataset(path)
