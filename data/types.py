"""The one record type every task produces: a question with its gold answers."""
from __future__ import annotations

from dataclasses import dataclass, field

MEMORY = "memory"  # the base model answers it from its weights (System 1)
LOOKUP = "lookup"  # it needs the search tool (System 2)
KINDS = (MEMORY, LOOKUP)


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answers: tuple[str, ...]            # every accepted gold answer (EM/F1 take the best)
    kind: str                           # MEMORY or LOOKUP
    type: str | None = None             # finer type: HotpotQA bridge/comparison, or capital/population/...
    level: str | None = None            # HotpotQA easy/medium/hard
    context: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (title, sentences) paragraphs
    supporting_titles: tuple[str, ...] = ()
    hops: tuple[str, ...] = field(default=())  # search queries that answer it, in order (for SFT traces)

    def __post_init__(self):
        if not self.question.strip():
            raise ValueError(f"example {self.id!r}: empty question")
        if not self.answers:
            raise ValueError(f"example {self.id!r}: no gold answer")
        if self.kind not in KINDS:
            raise ValueError(f"example {self.id!r}: kind={self.kind!r}, expected one of {KINDS}")
