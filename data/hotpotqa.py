"""HotpotQA (Yang et al., 2018, https://hotpotqa.github.io, CC BY-SA 4.0) as QAExamples.

Every HotpotQA question needs two Wikipedia paragraphs, so every example is kind LOOKUP.

    load_hotpotqa("../shared/data/hotpotqa/train_distractor_100.jsonl")   # local file
    load_hotpotqa("hotpotqa/hotpot_qa:distractor", split="validation")   # hub (needs internet)
    hotpotqa_documents(examples)   # the paragraphs the search environment indexes

Two record layouts are accepted, in a `.json` file (a JSON list) or a `.jsonl` file (one
object per line), or from the hub:

    row    (../shared/data/README.md)  context: [[title, [sentence, ...]], ...]
                                       supporting_facts: [[title, sent_id], ...]
                                       supporting_titles: [title, ...]   (optional)
    column (the hub's `datasets`)      context: {"title": [...], "sentences": [[...], ...]}
                                       supporting_facts: {"title": [...], "sent_id": [...]}

Required fields: `question`, `answer`, `context`. Optional: `id` (or `_id`; else the row
number), `type`, `level`, `supporting_facts`, `supporting_titles`. Any bad record raises a
ValueError that names the source, the line (or row) and the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from data.types import LOOKUP, QAExample
from envs.base import Document

DEFAULT_HUB_CONFIG = "distractor"
REQUIRED_FIELDS = ("question", "answer", "context")

Paragraphs = tuple[tuple[str, tuple[str, ...]], ...]


# --------------------------------------------------------------------------- field parsing
# Each helper takes `where` ("<source>, line 7") so that its error names the record.

def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _parse_context(ctx: Any, where: str) -> Paragraphs:
    """row [[title, [sentences]], ...] or column {title: [...], sentences: [[...]]} -> paragraphs."""
    if isinstance(ctx, dict):
        titles, sentences = ctx.get("title"), ctx.get("sentences")
        if not _is_str_list(titles) or not isinstance(sentences, list) or len(titles) != len(sentences):
            raise ValueError(f"{where}: field 'context': expected {{'title': [str], 'sentences': "
                             f"[[str]]}} with one sentence list per title")
        pairs = list(zip(titles, sentences))
    elif isinstance(ctx, list):
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in ctx):
            raise ValueError(f"{where}: field 'context': expected a list of [title, [sentences]] pairs")
        pairs = [tuple(p) for p in ctx]
    else:
        raise ValueError(f"{where}: field 'context': expected a list or a dict, got {type(ctx).__name__}")
    for title, sents in pairs:
        if not isinstance(title, str) or not _is_str_list(sents):
            raise ValueError(f"{where}: field 'context': paragraph {title!r} must be a title "
                             f"string and a list of sentence strings")
    if not pairs:
        raise ValueError(f"{where}: field 'context': no paragraphs")
    return tuple((title, tuple(sents)) for title, sents in pairs)


def _supporting_titles(row: dict, where: str) -> tuple[str, ...]:
    """`supporting_titles` if present, else the ordered unique titles of `supporting_facts`."""
    if row.get("supporting_titles") is not None:
        titles = row["supporting_titles"]
        if not _is_str_list(titles):
            raise ValueError(f"{where}: field 'supporting_titles': expected a list of strings")
        return tuple(dict.fromkeys(titles))
    facts = row.get("supporting_facts")
    if facts is None:
        return ()
    if isinstance(facts, dict):  # column: {"title": [...], "sent_id": [...]}
        titles = facts.get("title")
        if not _is_str_list(titles) or len(titles) != len(facts.get("sent_id") or []):
            raise ValueError(f"{where}: field 'supporting_facts': expected {{'title': [str], "
                             f"'sent_id': [int]}} of equal lengths")
    elif isinstance(facts, list) and all(isinstance(f, (list, tuple)) and len(f) == 2 for f in facts):
        titles = [f[0] for f in facts]  # row: [[title, sent_id], ...]
        if not all(isinstance(t, str) for t in titles):
            raise ValueError(f"{where}: field 'supporting_facts': titles must be strings")
    else:
        raise ValueError(f"{where}: field 'supporting_facts': expected [[title, sent_id], ...] "
                         f"or {{'title': [...], 'sent_id': [...]}}")
    return tuple(dict.fromkeys(titles))


def _optional_str(row: dict, name: str, where: str) -> str | None:
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r}: expected a string or null, got {type(value).__name__}")
    return value


def _to_example(row: Any, index: int, where: str) -> QAExample:
    """One HotpotQA record (row or column layout) -> a LOOKUP QAExample; hops = supporting titles."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in row or row[name] is None:
            raise ValueError(f"{where}: missing required field {name!r}")
    for name in ("question", "answer"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise ValueError(f"{where}: field {name!r}: expected a non-empty string, got {row[name]!r}")
    raw_id = row.get("id", row.get("_id"))
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise ValueError(f"{where}: field 'id': expected a string, got {type(raw_id).__name__}")
    supporting = _supporting_titles(row, where)
    return QAExample(
        id=str(raw_id) if raw_id is not None else f"row{index}",
        question=row["question"],
        answers=(row["answer"],),
        kind=LOOKUP,
        type=_optional_str(row, "type", where),
        level=_optional_str(row, "level", where),
        context=_parse_context(row["context"], where),
        supporting_titles=supporting,
        hops=supporting,
    )


# --------------------------------------------------------------------------- sources
# Each yields (record, where) pairs; `where` names the source and the line or row.

def _read_local(path: Path) -> Iterator[tuple[Any, str]]:
    """A JSON list (first character '[') or JSON lines (one object per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"HotpotQA file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from err
        for i, row in enumerate(rows):
            yield row, f"{path}, item {i}"
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {lineno}: invalid JSON ({err.msg})") from err
        yield row, f"{path}, line {lineno}"


def _read_hub(source: str, split: str) -> Iterator[tuple[Any, str]]:
    """`owner/name[:config]` through `datasets.load_dataset` (column layout)."""
    import datasets  # imported here: local files need no `datasets`

    name, _, config = source.partition(":")
    config = config or DEFAULT_HUB_CONFIG
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name or split: say which one
        raise ValueError(f"hub dataset {name!r} (config {config!r}, split {split!r}) "
                         f"could not be loaded: {err}") from err
    for i, row in enumerate(rows):
        yield row, f"hub dataset {source!r} split {split!r}, row {i}"


def _is_local(source: str) -> bool:
    return source.endswith((".json", ".jsonl")) or Path(source).exists()


# --------------------------------------------------------------------------- public API

def load_hotpotqa(source: str, split: str = "train", limit: int | None = None) -> list[QAExample]:
    """Load HotpotQA from a local `.json`/`.jsonl` file or a hub name (`hotpotqa/hotpot_qa[:config]`).

    `split` is only used for the hub (a local file is one split); `limit` keeps the first
    `limit` records. Raises FileNotFoundError for a missing file and ValueError (naming the
    source, line and field) for bad records or an empty result.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if _is_local(source):
        path = Path(source)
        if path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"{path}: expected a .json or .jsonl file")
        records: Iterable[tuple[Any, str]] = _read_local(path)
    else:
        records = _read_hub(source, split)
    examples = []
    for index, (row, where) in enumerate(records):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(_to_example(row, index, where))
    if not examples:
        raise ValueError(f"{source}: no HotpotQA examples found")
    return examples


def hotpotqa_documents(examples: Iterable[QAExample]) -> list[Document]:
    """Unique context paragraphs of `examples` as Documents, in order of first appearance.

    text = the sentences stripped and joined by one space (HotpotQA sentences carry their
    leading space; stripping also merges copies that differ only in whitespace).
    Deduplicated by (title, text): two different paragraphs with one title both stay.
    """
    seen: dict[Document, None] = {}
    for example in examples:
        for title, sentences in example.context:
            seen.setdefault(Document(title, " ".join(s.strip() for s in sentences)), None)
    return list(seen)
