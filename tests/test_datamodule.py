"""QADataModule: bad options and bad files fail early, naming the option, the file, the line and the
field (through the CLI too, and before any weights load); a missing traces file is made."""
from __future__ import annotations

import json
import re

import lightning as L
import pytest

from data.datamodule import QADataModule
from grpo.cli import main
from grpo.module import GRPOModule
from tests.fakes import HOTPOTQA_ROWS as ROWS
from tests.fakes import write_jsonl


def _cli_error(args: list[str], error=ValueError, match: str = ""):
    with pytest.raises(error, match=match):
        main(["-c", "configs/tiny.yaml", *args], run=False)


def _hotpot(tmp_path, train_rows=ROWS, **kwargs) -> QADataModule:
    return QADataModule(task="hotpotqa", train_path=str(write_jsonl(tmp_path / "train.jsonl", train_rows)), **kwargs)


def _trainer() -> L.Trainer:
    return L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def test_bad_data_options_through_the_cli_name_the_option(tmp_path):
    """Parsing the CLI builds the datamodule: these fail there, before any weights load."""
    _cli_error(["--data.task", "squad"], match=r"data.task='squad'")
    _cli_error(["--data.task", "hotpotqa"], match=r"data.train_path is required")
    missing = str(tmp_path / "missing.jsonl")
    _cli_error(["--data.task", "hotpotqa", "--data.train_path", missing], FileNotFoundError,
               match=re.escape(f"data.train_path={missing!r}: no such file"))
    good = str(write_jsonl(tmp_path / "train.jsonl", ROWS))
    _cli_error(["--data.task", "hotpotqa", "--data.train_path", good, "--data.val_path", missing],
               FileNotFoundError, match=r"data.val_path=.*missing.jsonl': no such file")
    _cli_error(["--data.batch_size", "0"], match=r"data.batch_size=0")
    _cli_error(["--data.train_limit", "0"], match=r"data.train_limit=0")
    _cli_error(["--data.val_limit", "-3"], match=r"data.val_limit=-3")


def test_bad_traces_files_fail_in_setup(tmp_path):
    bad = tmp_path / "traces.jsonl"
    bad.write_text(json.dumps({"id": "t1"}) + "\n")
    with pytest.raises(ValueError, match=r"traces\.jsonl, line 1: missing field"):
        QADataModule(traces=str(bad)).setup()
    bad.write_text("\n\n")
    with pytest.raises(ValueError, match=r"data.traces=.*traces\.jsonl': the file holds no trace"):
        QADataModule(traces=str(bad)).setup()


def test_hotpotqa_cold_start_traces_are_made_from_the_training_file(tmp_path):
    """task=hotpotqa with a missing traces file: multihop traces of the training file are written."""
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    dm = QADataModule(task="hotpotqa", train_path=str(train), batch_size=1, traces=str(tmp_path / "t.jsonl"),
                      num_traces=2)
    dm.setup()
    assert (tmp_path / "t.jsonl").exists() and dm.train_traces
    assert {t.style for t in dm.train_traces} == {"multihop"}
    assert {t.question for t in dm.train_traces} <= {r["question"] for r in ROWS}


def test_bad_data_stops_fit_before_the_model_loads(tmp_path):
    """Lightning calls the datamodule's setup before `configure_model`: no weights are loaded."""
    dm = _hotpot(tmp_path, [ROWS[0], {**ROWS[1], "context": "not paragraphs"}])
    module = GRPOModule(model_name="tiny", group_size=2)
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: field 'context'"):
        _trainer().fit(module, dm)
    assert module.policy is None


def test_batch_larger_than_the_training_split_fails_before_the_model_loads(tmp_path):
    module = GRPOModule(model_name="tiny", group_size=2)
    with pytest.raises(ValueError, match=r"data.batch_size=3 x 1 device\(s\) is more than the 2 training items"):
        _trainer().fit(module, _hotpot(tmp_path, batch_size=3))  # 2 training questions
    assert module.policy is None


def test_offline_train_path_replaces_the_training_split(tmp_path):
    from data.datamodule import QADataModule
    from data.questions import write_questions
    from data.types import LOOKUP, MEMORY, QAExample

    qs = [QAExample("capital/KE", "What is the capital of Kenya?", ("Nairobi",), MEMORY, "capital"),
          QAExample("population/KE", "How many people live in Kenya?", ("1",), LOOKUP, "population")]
    write_questions(qs, tmp_path / "train.jsonl")
    dm = QADataModule(task="offline", batch_size=2, train_path=str(tmp_path / "train.jsonl"))
    dm.setup("fit")
    assert [ex.id for ex in dm.train_set] == ["capital/KE", "population/KE"]
    assert dm.val_set and dm.documents  # validation split and documents still the task's own
    with pytest.raises(FileNotFoundError, match=r"data.train_path=.*nope.jsonl': no such question file"):
        QADataModule(task="offline", train_path=str(tmp_path / "nope.jsonl"))


def test_offline_train_path_list_reads_the_files_in_order(tmp_path):
    from data.datamodule import QADataModule
    from data.questions import write_questions
    from data.types import LOOKUP, MEMORY, QAExample

    write_questions([QAExample("capital/KE", "What is the capital of Kenya?", ("Nairobi",), MEMORY, "capital")],
                    tmp_path / "a.jsonl")
    write_questions([QAExample("general/Hamlet", "Who wrote Hamlet?", ("Shakespeare",), LOOKUP, "author"),
                     QAExample("general/Mars", "Which planet is red?", ("Mars",), MEMORY, "astronomy")],
                    tmp_path / "b.jsonl")
    dm = QADataModule(task="offline", batch_size=2, train_path=[str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")])
    dm.setup("fit")
    assert [ex.id for ex in dm.train_set] == ["general/Hamlet", "general/Mars", "capital/KE"]
    with pytest.raises(FileNotFoundError, match=r"data.train_path=.*nope.jsonl': no such question file"):
        QADataModule(task="offline", train_path=[str(tmp_path / "a.jsonl"), str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match=r"data.train_path=\[\]: a list of question files"):
        QADataModule(task="offline", train_path=[])
    with pytest.raises(ValueError, match=r"a list of question files is for task='offline'"):
        QADataModule(task="hotpotqa", train_path=[str(tmp_path / "a.jsonl")])


def test_general_docs_add_the_general_knowledge_documents_to_the_offline_tool():
    from data.datamodule import QADataModule
    from data.general_qa import ENTRIES

    plain, mixed = QADataModule(task="offline"), QADataModule(task="offline", general_docs=True)
    plain.setup("fit"), mixed.setup("fit")
    assert mixed.documents[:len(plain.documents)] == plain.documents
    assert [d.title for d in mixed.documents[len(plain.documents):]] == [e.title for e in ENTRIES]
    with pytest.raises(ValueError, match="data.general_docs=true: only for task='offline'"):
        QADataModule(task="hotpotqa", train_path="x.jsonl", general_docs=True)
