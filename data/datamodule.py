"""`QADataModule`: batches of questions for GRPO, SFT and evaluation, and the search env over them.

A batch is a plain list of `QAExample`s (B prompts); the module tokenizes, because the
rollout needs the text. The knowledge base behind the search tool comes with the task:
the offline task's country documents, or the HotpotQA paragraphs of every loaded example.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from data import general_qa
from data.loader import ReplayBatches, ResumableBatches, check_replay
from data.hotpotqa import hotpotqa_documents, load_hotpotqa
from data.offline_task import build_offline_task
from data.questions import read_questions
from data.types import QAExample
from envs.search import LocalSearchEnv

TASKS = ("offline", "hotpotqa")


def _collate(batch: list[QAExample]) -> list[QAExample]:
    return batch


def _as_list(path: str | list[str] | None) -> list:
    """`data.train_path` as a list: one file, or a list of question files (offline)."""
    return path if isinstance(path, list) else [path]


class QADataModule(L.LightningDataModule):
    def __init__(self, task: str = "offline", batch_size: int = 2, seed: int = 0,
                 train_path: str | list[str] | None = None, val_path: str | None = None,
                 train_limit: int | None = None, val_limit: int | None = 32,
                 search_top_k: int = 3, search_max_chars: int = 600, traces: str | None = None,
                 num_traces: int = 500, general_docs: bool = False, replay_slots: int = 0,
                 replay_max_redraws: int = 4):
        """
        Args:
            task: "offline" (GeoNames countries, no download) or "hotpotqa".
            batch_size: B, prompts per training step (each sampled G times by the module).
            seed: seed of the offline task's splits and of the training order.
            train_path: HotpotQA training source: a local .json/.jsonl file or a hub name
                (e.g. "hotpotqa/hotpot_qa"); required for task="hotpotqa". Offline: a question file
                (see `data.questions`) replacing the task's training split, e.g. a balanced one
                (`python -m data.questions --split train`), so that memory questions are not
                outnumbered ~7 to 1 by lookups in the GRPO prompts; or a list of question files,
                read one after the other (e.g. the countries' and `data.general_qa`'s).
            val_path: the questions of validation and test: HotpotQA: a file or hub name (split
                "validation"); offline: a question file (.jsonl, see `data.questions`) replacing the
                task's own validation and test splits, e.g. a balanced test set.
            train_limit: use only the first n training questions (None: all).
            val_limit: evaluate on the first n validation questions (None: all).
            search_top_k: hits per search.
            search_max_chars: cap on one observation's length, in characters.
            traces: SFT traces (.jsonl). When set, training batches are traces (the cold start) instead
                of questions; a missing file is generated from the task's training split (offline:
                `data.traces.offline_traces`; hotpotqa: multihop traces of `train_path`).
            num_traces: how many traces to generate when `traces` does not exist yet.
            general_docs: offline: the search tool also holds `data.general_qa`'s documents (general
                knowledge), for training files that mix its questions with the countries'.
            replay_slots: GRPO: up to this many of each batch's B prompts are questions drawn again because
                their last group split between searching and answering directly (`data.loader.ReplayBatches`;
                one process only); 0: every prompt is a fresh draw of a shuffled pass (`ResumableBatches`).
            replay_max_redraws: how many times in a row a question may be drawn again after a fresh draw.
        """
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"data.task={task!r}: expected one of {TASKS}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size}: must be >= 1")
        for name, value in (("train_limit", train_limit), ("val_limit", val_limit)):
            if value is not None and value < 1:
                raise ValueError(f"data.{name}={value}: must be >= 1 or null")
        if isinstance(train_path, list) and (task != "offline" or not train_path):
            raise ValueError(f"data.train_path={train_path!r}: a list of question files is for task='offline' "
                             f"and must not be empty")
        for name, path in [("train_path", p) for p in _as_list(train_path)] + [("val_path", val_path)]:
            if task == "offline" and path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"data.{name}={path!r}: no such question file")
        check_replay(replay_slots, batch_size, replay_max_redraws)
        if replay_slots and traces:
            raise ValueError(f"data.replay_slots={replay_slots} with data.traces={traces!r}: redraws are for GRPO's "
                             f"question batches, not SFT traces")
        if general_docs and task != "offline":
            raise ValueError(f"data.general_docs=true: only for task='offline' (got task={task!r})")
        if task == "hotpotqa":
            if train_path is None:
                raise ValueError("data.train_path is required for task='hotpotqa' (a .jsonl file or a hub name)")
            for name, path in (("train_path", train_path), ("val_path", val_path)):
                looks_local = path is not None and (path.endswith((".json", ".jsonl")) or path.startswith((".", "/")))
                if looks_local and not Path(path).is_file():
                    raise FileNotFoundError(f"data.{name}={path!r}: no such file")
        self.save_hyperparameters()
        self.train_set: list[QAExample] = []
        self.val_set: list[QAExample] = []
        self.test_set: list[QAExample] = []
        self.documents = []
        self.train_traces = []
        self._env = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set or self.val_set:
            return
        hp = self.hparams
        if hp.task == "offline":
            task = build_offline_task(seed=hp.seed)
            self.train_set, self.val_set, self.test_set = task.train, task.validation, task.test
            if hp.train_path:
                self.train_set = [ex for path in _as_list(hp.train_path) for ex in read_questions(path)]
            if hp.val_path:
                self.val_set = self.test_set = read_questions(hp.val_path)
            self.documents = task.documents + (general_qa.documents() if hp.general_docs else [])
        else:
            self.train_set = load_hotpotqa(hp.train_path, "train")
            self.val_set = load_hotpotqa(hp.val_path, "validation") if hp.val_path else []
            self.test_set = self.val_set
            self.documents = hotpotqa_documents(self.train_set + self.val_set)
        if hp.train_limit:
            self.train_set = self.train_set[:hp.train_limit]
        if hp.val_limit:
            self.val_set, self.test_set = self.val_set[:hp.val_limit], self.test_set[:hp.val_limit]
        if not self.train_set:
            raise ValueError(f"data: the training split of task {hp.task!r} is empty")
        if hp.traces:
            self.train_traces = self._load_traces(Path(hp.traces))
        world = self.trainer.world_size if self.trainer is not None else 1
        n_train = len(self.train_traces or self.train_set)
        if hp.batch_size * world > n_train:
            raise ValueError(f"data.batch_size={hp.batch_size} x {world} device(s) is more than the "
                             f"{n_train} training items of task {hp.task!r}")

    def _load_traces(self, path: Path):
        from data.traces import hotpotqa_traces, offline_traces, read_traces, write_traces

        hp = self.hparams
        if not path.exists():  # made once, from the task's own training split
            path.parent.mkdir(parents=True, exist_ok=True)
            traces = (offline_traces(n=hp.num_traces, seed=hp.seed) if hp.task == "offline"
                      else hotpotqa_traces(hp.train_path, n=hp.num_traces, seed=hp.seed))
            write_traces(traces, path)
        traces = read_traces(path)
        if not traces:
            raise ValueError(f"data.traces={str(path)!r}: the file holds no trace")
        return traces

    def search_env(self) -> LocalSearchEnv:
        """The search tool over this task's documents (built once)."""
        if self._env is None:
            self.setup()
            self._env = LocalSearchEnv(self.documents, top_k=self.hparams.search_top_k,
                                      max_chars=self.hparams.search_max_chars)
        return self._env

    def train_dataloader(self) -> ResumableBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        hp = self.hparams
        if hp.replay_slots:
            return ReplayBatches(self.train_set, hp.batch_size, hp.seed, slots=hp.replay_slots,
                                 max_redraws=hp.replay_max_redraws, rank=rank, world_size=world)
        return ResumableBatches(self.train_traces or self.train_set, hp.batch_size, hp.seed, rank=rank, world_size=world)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, collate_fn=_collate)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.hparams.batch_size, collate_fn=_collate)
