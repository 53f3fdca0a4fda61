"""Prompt datasets: JSONL and Parquet rows, DAPO's layout, bad rows named by file and row, length
filtering, and a reproducible, resumable prompt order."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megacov.config import load_config
from megacov.data import DataError, LoadReport, PromptLoader, load_from_config, load_prompts, sft_examples
from megacov.tiny import build_tokenizer, write_task_data


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _write_jsonl(path, rows):
    with open(path, "w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _load(paths, tok, **kw):
    args = dict(prompt_key="prompt", answer_key="answer", max_prompt_len=64, on_bad_row="error",
                chat_template=True)
    args.update(kw)
    return load_prompts(paths, tok, **args)


def test_jsonl_rows_become_token_ids(tmp_path, tok):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "12+3=", "answer": "15"}, {"prompt": "1+1=", "answer": 2}])
    recs = _load([path], tok)
    assert [r.answer for r in recs] == ["15", "2"]
    assert list(recs[0].prompt_ids) == tok("12+3=")["input_ids"]
    assert [r.row for r in recs] == [1, 2] and [r.uid for r in recs] == [0, 1]


def test_dapo_layout_parquet_works_with_default_keys(tmp_path, tok):
    rows = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": "2+2="}],
             "ability": "MATH", "reward_model": {"ground_truth": "4", "style": "rule-math"},
             "extra_info": {"index": "a"}}]
    path = str(tmp_path / "dapo.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = load_config(None, [f"data.train_files=[{path}]"])
    recs = load_from_config(cfg.data.train_files, tok, cfg.data)
    assert recs[0].answer == "4" and recs[0].question == "2+2="
    assert list(recs[0].prompt_ids) == tok("2+2=")["input_ids"]


def test_chat_template_is_applied_when_the_tokenizer_has_one(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    path = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1+2=", "answer": "3"}])
    with_template = _load([path], tok)[0].prompt_ids
    without = _load([path], tok, chat_template=False)[0].prompt_ids
    assert list(with_template) == tok("<1+2=>:")["input_ids"]
    assert list(without) == tok("1+2=")["input_ids"]


@pytest.mark.parametrize("bad, reason", [
    ("{not json", "invalid JSON"),
    (json.dumps({"answer": "3"}), "missing prompt field 'prompt'"),
    (json.dumps({"prompt": "1+2="}), "missing answer field 'answer'"),
    (json.dumps({"prompt": "", "answer": "3"}), "empty prompt"),
    (json.dumps({"prompt": [{"role": "user"}], "answer": "3"}), "prompt message 0"),
    (json.dumps({"prompt": "1+2=", "answer": {"style": "x"}}), "no 'ground_truth'"),
    (json.dumps({"prompt": "1+2=", "answer": [3]}), "answer must be a string or number"),
    (json.dumps([1, 2]), "row is a list"),
])
def test_bad_row_error_names_file_and_row(tmp_path, tok, bad, reason):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}, "", bad])
    with pytest.raises(DataError) as err:
        _load([path], tok)
    assert f"{path}: row 3: " in str(err.value) and reason in str(err.value)


def test_bad_rows_skipped_and_counted(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}, "{oops", {"prompt": "x"},
                                               {"prompt": "2+2=", "answer": "4"}])
    report = LoadReport()
    recs = _load([path], tok, on_bad_row="skip", report=report)
    assert [r.answer for r in recs] == ["2", "4"] and [r.row for r in recs] == [1, 4]
    assert (report.rows, report.bad_rows, report.kept) == (4, 2, 2)
    assert "row 2" in report.examples[0] and "row 3" in report.examples[1]


def test_long_prompts_filtered_and_counted(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1" * 20, "answer": "1"}])
    report = LoadReport()
    recs = _load([path], tok, max_prompt_len=10, report=report)
    assert len(recs) == 1 and report.too_long == 1


def test_missing_file_and_nothing_usable_are_clear_errors(tmp_path, tok):
    with pytest.raises(DataError, match="not found"):
        _load([str(tmp_path / "nope.jsonl")], tok)
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1" * 20, "answer": "1"}])
    with pytest.raises(DataError, match="no usable prompts"):
        _load([path], tok, max_prompt_len=5)


def _uids(loader, n):
    return [r.uid for r in loader.next(n)]


def test_loader_order_is_seeded_covers_each_epoch_and_resumes_exactly(tmp_path, tok):
    paths = write_task_data(str(tmp_path), n_train=10, n_eval=2)
    recs = _load([paths["train"]], tok)
    a = PromptLoader(recs, shuffle=True, seed=3)
    first_epoch = _uids(a, 10)
    assert sorted(first_epoch) == list(range(10)) and first_epoch != list(range(10))
    assert a.epoch == 0 and a.epochs_done == 1.0
    crossing = _uids(a, 4)
    assert a.epoch == 1 and a.cursor == 4 and len(set(crossing)) == 4
    state = a.state_dict()
    rest = _uids(a, 13)
    b = PromptLoader(recs, shuffle=True, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert _uids(b, 13) == rest
    c = PromptLoader(recs, shuffle=True, seed=4)
    assert _uids(c, 10) != first_epoch
    assert _uids(PromptLoader(recs, shuffle=False, seed=3), 10) == list(range(10))


def test_loader_refuses_a_changed_dataset(tmp_path, tok):
    paths = write_task_data(str(tmp_path), n_train=10, n_eval=2)
    recs = _load([paths["train"]], tok)
    state = PromptLoader(recs, shuffle=True, seed=0).state_dict()
    with pytest.raises(DataError, match="data changed"):
        PromptLoader(recs[:9], shuffle=True, seed=0).load_state_dict(state)


def test_sft_examples_end_with_eos(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+11=", "answer": "12"}])
    ex = sft_examples(_load([path], tok), tok, max_response_len=4)[0]
    assert list(ex.response_ids) == tok("12")["input_ids"] + [tok.eos_token_id]
    with pytest.raises(DataError, match="row 1"):
        sft_examples(_load([path], tok), tok, max_response_len=2)
