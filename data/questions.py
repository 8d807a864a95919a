"""Question files: evaluate any checkpoint on any set of questions, and balanced test sets.

A question file is JSON Lines, one question per line:

    {"id": "capital/KE", "question": "What is the capital of Kenya?", "answers": ["Nairobi"], "kind": "memory"}

`answers` (a list) or `answer` (a string) is required; `id` defaults to the line number; `kind`
(memory | lookup) is optional and gives the per-kind evaluation figures; `type` is kept if given.
HotpotQA files are read by `data.hotpotqa` instead (`data.task: hotpotqa`).

    python -m data.questions --out questions/test_balanced.jsonl      # the offline test split, balanced
    python -m data.questions --split train --within-types 12 --out questions/train_within_types.jsonl

Balanced: as many memory as lookup questions (all of the rarer kind, the same number of the other
drawn with a string-seeded RNG and stratified by type), so that the headline EM and search rate are
not dominated by the lookup questions, which outnumber memory questions ~7 to 1 in the offline task.

Balanced within types (`--within-types N`, for training prompts): every type that has memory questions
gets as many lookups *of that type* as memory questions, and each lookup-only type N questions. A set
balanced only by kind keeps the types' own mix (offline training split: capitals and continents are 87 %
known in `balanced`'s draw, 45-53 % in the split), so "capitals and continents are answered directly" is a
rule that pays there; within types, only what the model knows of each question tells the two apart.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from data.files import atomic_write, iter_json_lines
from data.types import KINDS, LOOKUP, MEMORY, QAExample


def _example(record, where: str) -> QAExample:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    answers = record.get("answers", [record["answer"]] if "answer" in record else None)
    if isinstance(answers, str):
        answers = [answers]
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"{where}: expected \"answers\" (a list of strings) or \"answer\" (a string)")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: expected a non-empty string field \"question\"")
    kind = record.get("kind", LOOKUP)
    if kind not in KINDS:
        raise ValueError(f"{where}: kind={kind!r}, expected one of {KINDS}")
    return QAExample(id=str(record.get("id", where)), question=question.strip(), answers=tuple(answers),
                     kind=kind, type=record.get("type"))


def read_questions(path: str | Path) -> list[QAExample]:
    """The questions of a JSON Lines file (see the module docstring); errors name the file and line.

    A row without `kind` counts as lookup (the tool may be needed), so per-kind figures of a file
    without kinds are simply the overall ones under `lookup`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such question file")
    out = [_example(record, where) for record, where in iter_json_lines(path)]
    if not out:
        raise ValueError(f"{str(path)!r}: the file holds no question")
    return out


def write_questions(examples: Sequence[QAExample], path: str | Path) -> None:
    rows = [{"id": ex.id, "question": ex.question, "answers": list(ex.answers), "kind": ex.kind, "type": ex.type}
            for ex in examples]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _draw(pool: Sequence[QAExample], n: int, key: str) -> list[QAExample]:
    """`n` of `pool` (all if fewer): its first `n` after a shuffle by random.Random(key)."""
    group = list(pool)
    random.Random(key).shuffle(group)
    return group[:n]


def balanced(examples: Sequence[QAExample], seed: int = 0) -> list[QAExample]:
    """As many memory as lookup questions: all of the rarer kind, an equal draw of the other.

    The draw is stratified by `type` (largest remainder over the type shares), each type shuffled with
    random.Random(f"{seed}/{type}") over examples sorted by id, so the same input gives the same set.
    """
    by_kind = {k: sorted((ex for ex in examples if ex.kind == k), key=lambda ex: ex.id) for k in (MEMORY, LOOKUP)}
    n = min(len(v) for v in by_kind.values())
    if n == 0:
        raise ValueError(f"cannot balance: {len(by_kind[MEMORY])} memory and {len(by_kind[LOOKUP])} lookup questions")
    picked = []
    for kind, pool in by_kind.items():
        by_type = defaultdict(list)
        for ex in pool:
            by_type[ex.type].append(ex)
        exact = {t: n * len(v) / len(pool) for t, v in by_type.items()}
        quota = {t: int(x) for t, x in exact.items()}
        for t in sorted(exact, key=lambda t: (quota[t] - exact[t], str(t)))[:n - sum(quota.values())]:
            quota[t] += 1
        for t in sorted(by_type, key=str):
            picked += _draw(by_type[t], quota[t], f"{seed}/{t}")
    return sorted(picked, key=lambda ex: (ex.kind, ex.id))


def balanced_within_types(examples: Sequence[QAExample], per_lookup_type: int, seed: int = 0) -> list[QAExample]:
    """For every type with memory questions, as many memory as lookup questions of that type (all of the
    rarer kind, a draw of the other); for every lookup-only type, `per_lookup_type` of them (or all if fewer).

    Draws shuffle each (type, kind) with random.Random(f"{seed}/{type}/{kind}") over examples sorted by id.
    """
    if isinstance(per_lookup_type, bool) or not isinstance(per_lookup_type, int) or per_lookup_type < 0:
        raise ValueError(f"per_lookup_type={per_lookup_type!r}: must be an integer >= 0")
    pools = defaultdict(list)  # (type, kind) -> examples sorted by id
    for ex in sorted(examples, key=lambda ex: ex.id):
        pools[(ex.type, ex.kind)].append(ex)
    memory_types = {t for t, kind in pools if kind == MEMORY}
    if not memory_types:
        raise ValueError("cannot balance within types: no memory questions")
    picked = []
    for t in sorted({t for t, _ in pools}, key=str):
        if t in memory_types:
            n = min(len(pools[(t, MEMORY)]), len(pools[(t, LOOKUP)]))
            quotas = {MEMORY: n, LOOKUP: n}
        else:
            quotas = {LOOKUP: per_lookup_type}
        for kind, n in quotas.items():
            picked += _draw(pools[(t, kind)], n, f"{seed}/{t}/{kind}")
    return sorted(picked, key=lambda ex: (ex.kind, ex.id))


def main(argv: Sequence[str] | None = None) -> None:
    from data.offline_task import build_offline_task

    p = argparse.ArgumentParser(prog="python -m data.questions", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the question file to write (.jsonl)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--seed", type=int, default=0, help="seed of the offline task's splits and of the draw")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--unbalanced", action="store_true", help="the whole split, not a balanced draw")
    how.add_argument("--within-types", type=int, metavar="N",
                     help="balanced within each type that has memory questions, N of each lookup-only type")
    args = p.parse_args(argv)
    examples = getattr(build_offline_task(seed=args.seed), args.split)
    if args.unbalanced:
        chosen = examples
    elif args.within_types is not None:
        chosen = balanced_within_types(examples, args.within_types, args.seed)
    else:
        chosen = balanced(examples, args.seed)
    write_questions(chosen, args.out)
    counts = {k: sum(ex.kind == k for ex in chosen) for k in KINDS}
    print(f"{args.out}: {len(chosen)} questions of the {args.split} split ({counts})")


if __name__ == "__main__":
    main()
