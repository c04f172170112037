"""Data people already have: file kinds (JSONL, JSON arrays, Parquet, save_to_disk folders,
hub ids through `datasets`) and row shapes (ShareGPT, Alpaca, mapped columns), each with
bad rows that name where they are. Every file is written by the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpd.data.batches import load_dataset
from hpd.data.examples import DataError
from hpd.data.formats import normalize, parse_columns
from hpd.data.sources import read_rows

CHAT = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on a mat"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "the cat"},
                              {"from": "gpt", "value": "sat on a mat"}]}
ALPACA = {"instruction": "the cat", "input": "one two", "output": "sat on a mat"}
PROMPT = {"prompt": "the cat", "completion": "sat on a mat"}
TEXT = {"text": "the dog ran to it"}
ROWS = [CHAT, SHAREGPT, ALPACA, PROMPT, TEXT]


@pytest.fixture(scope="module")
def tok(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["tokenizer"])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ row shapes
def test_sharegpt_becomes_messages():
    assert normalize(SHAREGPT) == {"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat on a mat"}]}


def test_alpaca_becomes_messages_with_the_input_after_the_instruction():
    msgs = normalize(ALPACA)["messages"]
    assert msgs == [{"role": "user", "content": "the cat\n\none two"}, {"role": "assistant", "content": "sat on a mat"}]
    assert normalize({"instruction": "a", "output": "b"})["messages"][0]["content"] == "a"


def test_column_mapping():
    cols = parse_columns(["messages=dialog"])
    row = normalize({"dialog": CHAT["messages"], "id": 3}, cols)
    assert row["messages"] == CHAT["messages"]
    assert parse_columns("prompt=question,completion=answer") == {"prompt": "question", "completion": "answer"}
    with pytest.raises(ValueError, match="unknown field 'mesages'.*allowed: messages"):
        parse_columns(["mesages=dialog"])
    with pytest.raises(ValueError, match="NAME=COLUMN"):
        parse_columns(["messages"])


@pytest.mark.parametrize("row, message", [
    ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown speaker 'robot'; allowed: human"),
    ({"conversations": [{"from": "human"}]}, 'conversations\\[0\\] must have string "from" and "value"'),
    ({"conversations": []}, "non-empty list"),
    ({"instruction": "x", "output": ""}, '"output" must be a non-empty string'),
    ({"instruction": "x", "input": 3, "output": "y"}, '"input" must be a string'),
    ({"question": "x"}, "ShareGPT .*Alpaca.*got keys \\['question'\\].*--data-columns"),
])
def test_bad_shapes(row, message):
    with pytest.raises(ValueError, match=message):
        normalize(row)


def test_every_shape_in_one_file_trains(tok, tmp_path):
    data = load_dataset(write_jsonl(tmp_path / "mixed.jsonl", ROWS), tok, 256)
    assert data.rows == len(ROWS) == len(data)
    # ShareGPT and Alpaca rows learn only their assistant turn, as the messages row does
    chat, share, alpaca = data.examples[:3]
    target = tok.encode("sat on a mat", add_special_tokens=False)
    for ex in (chat, share, alpaca):
        learned = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
        assert learned[:len(target)] == target, (ex, target)


# ------------------------------------------------------------------ file kinds
def test_json_array_with_lines(tok, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS, indent=2))
    rows = read_rows(path)
    assert [r for _, r in rows][3] == PROMPT
    assert rows[0][0] == f"{path}:2"  # the first element starts on line 2 of the indented array
    assert len(load_dataset(path, tok, 256)) == len(ROWS)


def test_json_array_bad_row_names_its_line(tok, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n  {"prompt": "b"}\n]\n')
    with pytest.raises(DataError, match=f'{path}:3: "completion" must be a string'):
        load_dataset(path, tok, 16)
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    with pytest.raises(DataError, match=f"{path}:4: not valid JSON"):
        read_rows(path)
    path.write_text('[{"text": "a"}, 3]')
    with pytest.raises(DataError, match=f"{path}:1: expected a JSON object, got int"):
        read_rows(path)


def test_json_file_of_lines_is_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "rows.json", [TEXT, PROMPT])
    assert [r for _, r in read_rows(path)] == [TEXT, PROMPT]


def test_parquet(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    rows = [{"dialog": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]},
            {"dialog": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = load_dataset(path, tok, 256, columns={"messages": "dialog"})
    assert len(data) == 2
    with pytest.raises(DataError, match=f"{path}:row 0: expected .*got keys \\['dialog'\\]"):
        load_dataset(path, tok, 256)


def test_save_to_disk_folder_and_splits(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([PROMPT, PROMPT, PROMPT]),
        "test": datasets.Dataset.from_list([{"prompt": "x", "completion": "y"}]),
    }).save_to_disk(str(folder))
    assert len(load_dataset(folder, tok, 256)) == 3  # train by default
    assert len(load_dataset(folder, tok, 256, split="test")) == 1
    with pytest.raises(DataError, match="no split 'dev'; the splits are train, test"):
        load_dataset(folder, tok, 256, split="dev")
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([PROMPT, {"prompt": "x", "completion": ""}]).save_to_disk(str(bad))
    with pytest.raises(DataError, match=f'{bad}:train:1: "completion" is empty|{bad}:data:1: "completion" is empty'):
        load_dataset(bad, tok, 256)


def test_hub_dataset_id_goes_through_datasets(tok, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import hpd.files.hub

    monkeypatch.setattr(hpd.files.hub, "hub_unreachable", lambda timeout=0: "")
    calls = []

    def fake_load(name, split=None):
        calls.append((name, split))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(
            [SHAREGPT, {"conversations": [{"from": "robot", "value": "x"}]}]),
                                     "validation": datasets.Dataset.from_list([SHAREGPT])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(DataError, match="someone/chats:train:1: conversations\\[0\\]: unknown speaker 'robot'"):
        load_dataset("someone/chats", tok, 256)
    assert len(load_dataset("someone/chats", tok, 256, split="validation")) == 1
    assert calls == [("someone/chats", None), ("someone/chats", "validation")]


def test_unreachable_hub_dataset_fails_fast(tok, monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    import time

    started = time.perf_counter()
    with pytest.raises(DataError, match="hub is unreachable \\(HF_HUB_OFFLINE is set\\)"):
        load_dataset("nobody-here/no-such-data", tok, 256)
    assert time.perf_counter() - started < 20


def test_missing_local_file_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_rows("data/train.parquet")


def test_split_on_a_plain_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="--data-split applies to"):
        read_rows(write_jsonl(tmp_path / "a.jsonl", [TEXT]), split="train")


@pytest.mark.slow
def test_cli_reads_mapped_parquet_and_saved_splits(assets, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    from click.testing import CliRunner
    from hpd.cli.main import cli

    train = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"dialog": CHAT["messages"]}] * 8), train)
    held = tmp_path / "held"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([ALPACA] * 4)}).save_to_disk(str(held))
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(assets["teacher"]), "--student", str(assets["student"]), "--data", str(train),
            "--data-columns", "messages=dialog", "--eval-data", str(held), "--eval-data-split", "validation",
            "--out", str(out), "--steps", "1", "--batch-size", "4", "--chunked", "off", "--no-progress",
            "--report-to", "none"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"data: 8 rows from {train}" in result.output and "eval: loss" in result.output
    saved = (out / "config.yaml").read_text()
    assert "messages: dialog" in saved and "eval_data_split: validation" in saved
    assert len((out / "hpd_export.json").read_text()) > 0
