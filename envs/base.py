"""What a tool is: a name, a description for the prompt, and `__call__(query) -> str`."""
from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable


class Document(NamedTuple):
    """One entry of a search collection."""
    title: str
    text: str


@runtime_checkable
class Tool(Protocol):
    name: str
    description: str

    def __call__(self, query: str) -> str:
        """Answer a query with an observation string. Never raises on bad queries."""
        ...
