"""--dataset: text through the `datasets` package (local files and folders offline; hub names and presets when
online), with calibration and evaluation from different records or splits, and clear refusals."""
from __future__ import annotations

import json

import pytest

from calm.config import CalmUsageError, DataConfig
from calm.data import DATASET_PRESETS, load_data_split

pytest.importorskip("datasets")
WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jumbo vortex".split()


def records(n: int, seed: int = 0) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j + seed) % len(WORDS)] for j in range(20)) + f" record {seed}-{i}"
            for i in range(n)]


def test_jsonl_records_alternate_and_never_share_text(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = records(10)
    path.write_text("\n".join(json.dumps({"content": r, "id": i}) for i, r in enumerate(rows)))
    split = load_data_split(DataConfig(dataset=str(path), text_column="content"))
    assert split.calibration.split("\n\n") == rows[0::2] and split.evaluation.split("\n\n") == rows[1::2]
    assert "records alternating" in split.name
    again = load_data_split(DataConfig(dataset=str(path), text_column="content"))
    assert again.sha256 == split.sha256  # the same split from the same data


def test_a_folder_of_parquet_files_with_two_named_splits(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": records(6, 1)}).to_parquet(str(tmp_path / "train.parquet"))
    Dataset.from_dict({"text": records(4, 2)}).to_parquet(str(tmp_path / "test.parquet"))
    # One folder loads as one split ("train"); the two splits come from two named files instead.
    split = load_data_split(DataConfig(dataset=str(tmp_path / "train.parquet")))
    assert len(split.calibration.split("\n\n")) == 3
    folder = load_data_split(DataConfig(dataset=str(tmp_path)))
    assert len((folder.calibration + "\n\n" + folder.evaluation).split("\n\n")) == 10


def test_text_file_read_by_paragraph(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(records(6)))
    split = load_data_split(DataConfig(dataset=str(path)))
    assert len(split.calibration.split("\n\n")) == 3 and len(split.evaluation.split("\n\n")) == 3


def test_refusals(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": r}) for r in records(4)))
    with pytest.raises(CalmUsageError, match=r"has columns \['body'\], not 'text': name the text column"):
        load_data_split(DataConfig(dataset=str(path)))
    with pytest.raises(CalmUsageError, match="has splits \\['train'\\], not 'validation'"):
        load_data_split(DataConfig(dataset=str(path), text_column="body", calib_split="train",
                                   eval_split="validation"))
    with pytest.raises(CalmUsageError, match="would share text"):
        DataConfig(dataset=str(path), calib_split="train", eval_split="train")
    with pytest.raises(CalmUsageError, match="--text and --dataset both name the text"):
        DataConfig(text="a.txt", dataset=str(path))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "x.bin").write_bytes(b"\0")
    with pytest.raises(CalmUsageError, match="give a .json, .jsonl, .parquet, .csv or .txt file"):
        load_data_split(DataConfig(dataset=str(tmp_path / "odd")))


def test_presets_ask_the_hub_for_the_named_splits(monkeypatch):
    """Offline, the hub is replaced: a preset names its dataset, configuration and splits."""
    import datasets
    from datasets import Dataset, DatasetDict

    asked = {}

    def fake_load_dataset(name, config=None, data_files=None, **kwargs):
        asked.update(name=name, config=config, data_files=data_files)
        return DatasetDict({"train": Dataset.from_dict({"text": records(4, 3)}),
                            "test": Dataset.from_dict({"text": records(2, 4)})})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    split = load_data_split(DataConfig(dataset="wikitext"))
    assert asked == {"name": "wikitext", "config": "wikitext-2-raw-v1", "data_files": None}
    assert split.evaluation.split("\n\n") == records(2, 4) and "train / test" in split.name
    assert set(DATASET_PRESETS) == {"wikitext", "c4", "pile-val"}


def test_offline_hub_name_is_refused_with_the_fix(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/data' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CalmUsageError, match="offline, pass a local file or folder"):
        load_data_split(DataConfig(dataset="someone/data"))


def test_command_line_runs_on_a_dataset_and_records_it(tmp_path, tiny_model_dir):
    from calm.run import main

    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(records(8, i))}) for i in range(12)))
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--dataset", str(path), "--output", str(out), "--scheme",
                 "W4A16G32", "--pool", "rtn", "--calib-windows", "2", "--calib-seqlen", "32", "--eval-seqlen", "32",
                 "--eval-tokens", "128", "--no-baselines", "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["calibration"]["text"].startswith(f"dataset {path}")
    assert results["config"]["data"]["dataset"] == str(path)
