"""A deterministic local search tool over a fixed document collection.

`LocalSearchEnv(documents)(query)` returns up to `top_k` hits, one `[Title] snippet` line
each. Hits come from three tiers, in this order, without duplicates:

1. Exact title: the normalized query equals a normalized title. One dict lookup, O(1).
   Normalizing lowercases, strips accents (NFKD), turns punctuation into spaces,
   collapses whitespace and drops a leading "the", "a" or "an". So "the beatles",
   "Beatles!" and "BEATLES" all find "The Beatles"; "Pelé" finds "Pele".
2. Partial title, on whole words: the query is part of a title ("Obama" finds
   "Barack Obama") or a title is part of the query ("who is Barack Obama?" finds it).
   Ranked by words in common (most first), then shorter title, then title A-Z.
   Both directions use indexes built once (first word -> title lengths, word -> titles),
   so a query never scans every title. Matches made only of stopwords are ignored.
3. Content: BM25 (Robertson et al., 1994; the `bm25s` package, Lucene variant) over
   title + text, with our own tokenizer (the same normalization, whitespace split,
   a small stopword list), so nothing is downloaded. Only documents sharing a word
   with the query are returned.

Every tie is broken by document position, so the same query always gives
byte-identical output. Duplicated titles are allowed: an exact or partial title match
returns all of them, and each is also retrievable by its content.
"""
from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from typing import Any, Sequence

import bm25s
import numpy as np

from envs.base import Document

STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or but is are was were be been it its "
    "as that this what who whom which when where why how did does do".split()
)
LEADING_ARTICLES = ("the ", "a ", "an ")
MAX_QUERY_CHARS = 2000  # longer queries are cut before search (keeps every call fast)
MAX_QUERY_WORDS = 64  # tier 2 looks for titles inside the first 64 words of the query
ECHO_CHARS = 80  # how much of the query the "No results" message repeats
ELLIPSIS = "…"


# --- text helpers -------------------------------------------------------------------

def no_results(query: str, max_chars: int) -> str:
    """The observation of a search that finds nothing: "No results for 'Juliet'."."""
    return truncate(f"No results for '{truncate(one_line(query), ECHO_CHARS)}'.", max_chars)


class EmptySearch:
    """A search tool that finds nothing, whatever the query: an outage, or a question outside what the
    tool covers. Its observation is `LocalSearchEnv`'s own for an empty result (`no_results`)."""

    def __init__(self, max_chars: int = 600):
        self.max_chars = max_chars

    def __call__(self, query: Any) -> str:
        return no_results(str(query), self.max_chars)


def normalize(text: str) -> str:
    """Lowercase, strip accents and punctuation, collapse whitespace: 'Pelé's  Cup!' -> 'peles cup'."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    text = re.sub(r"['’`]", "", text)  # "O'Brien" -> "obrien", not "o brien"
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def normalize_title(text: str) -> str:
    """`normalize`, then drop one leading article ('The Beatles' -> 'beatles'), unless nothing would be left."""
    norm = normalize(text)
    for article in LEADING_ARTICLES:
        if norm.startswith(article):
            return norm[len(article):]
    return norm


def tokenize(text: str) -> list[str]:
    """BM25 tokens: normalized words minus stopwords."""
    return [word for word in normalize(text).split() if word not in STOPWORDS]


def truncate(text: str, limit: int) -> str:
    """Cut `text` to at most `limit` chars, at a word boundary when there is one, ending in '…'."""
    if len(text) <= limit:
        return text
    if limit < 1:
        return ""
    cut = text[: limit - 1]
    if not text[limit - 1].isspace() and cut.rfind(" ") > 0:  # the cut splits a word: drop it
        cut = cut[: cut.rfind(" ")]
    return cut.rstrip() + ELLIPSIS


def one_line(text: str) -> str:
    """Collapse all whitespace (newlines included) into single spaces."""
    return " ".join(text.split())


# --- the tool -----------------------------------------------------------------------

class LocalSearchEnv:
    """Search tool over `documents`: exact title, then partial title, then BM25 content.

    Args:
        documents: the collection; may be empty (every query then has no results).
            Duplicated titles are allowed.
        top_k: maximum number of hits per query.
        max_chars: hard cap on the length of the returned observation.
        snippet_chars: each hit's text is cut to this many chars at a word boundary.
    """

    name = "search"

    def __init__(self, documents: Sequence[Document], top_k: int = 3, max_chars: int = 600,
                 snippet_chars: int = 250):
        for option, value in (("top_k", top_k), ("max_chars", max_chars), ("snippet_chars", snippet_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
        self.documents = tuple(Document(*doc) for doc in documents)
        self.top_k, self.max_chars, self.snippet_chars = top_k, max_chars, snippet_chars
        self.description = (
            f"search(query): look up documents by title or keywords; returns up to "
            f"{top_k} '[Title] snippet' lines, best first."
        )

        # Tier 1: normalized title -> positions of the documents with that title.
        self._by_title: dict[str, list[int]] = defaultdict(list)
        for i, doc in enumerate(self.documents):
            self._by_title[normalize_title(doc.title)].append(i)
        self._by_title.pop("", None)  # untitled documents are found by content only
        self._by_title = dict(self._by_title)  # lookups must not insert keys
        # Tier 2: first word -> word counts of titles starting with it; word -> titles with it.
        self._title_lengths: dict[str, set[int]] = defaultdict(set)
        self._titles_with_word: dict[str, set[str]] = defaultdict(set)
        for title in self._by_title:
            words = title.split()
            self._title_lengths[words[0]].add(len(words))
            for word in words:
                self._titles_with_word[word].add(title)

        # Tier 3: BM25 over title + text (bm25s cannot index a collection without any word).
        corpus_tokens = [tokenize(f"{doc.title} {doc.text}") for doc in self.documents]
        self._bm25 = None
        if any(corpus_tokens):
            self._bm25 = bm25s.BM25()
            self._bm25.index(corpus_tokens, show_progress=False)

    # --- tiers ----------------------------------------------------------------------

    def _exact_title(self, query: str) -> list[int]:
        """Tier 1: documents whose normalized title equals the normalized query."""
        return list(self._by_title.get(normalize_title(query), ()))

    def _partial_title(self, query: str) -> list[int]:
        """Tier 2: titles inside the query, or the query inside a title, on whole words."""
        words = normalize_title(query).split()[:MAX_QUERY_WORDS]
        overlap: dict[str, int] = {}  # matched title -> number of words in common
        # (b) a title is a run of query words: try only runs whose length some title
        # starting with that word has.
        for start, word in enumerate(words):
            for length in self._title_lengths.get(word, ()):
                run = words[start:start + length]
                title = " ".join(run)
                if len(run) == length and title in self._by_title and not STOPWORDS.issuperset(run):
                    overlap[title] = max(overlap.get(title, 0), length)
        # (a) the query is a run of title words: check the titles holding its rarest word.
        if words and not STOPWORDS.issuperset(words):
            phrase = f" {' '.join(words)} "
            candidates = min((self._titles_with_word.get(w, set()) for w in words), key=len)
            for title in candidates:
                if phrase in f" {title} ":
                    overlap[title] = max(overlap.get(title, 0), len(words))
        ranked = sorted(overlap, key=lambda t: (-overlap[t], len(t.split()), t))
        return [i for title in ranked for i in self._by_title[title]]

    def _content(self, query: str, k: int) -> list[int]:
        """Tier 3: the `k` best BM25 matches with a positive score (ties: lower position first)."""
        if self._bm25 is None:
            return []
        token_ids = self._bm25.get_tokens_ids(list(dict.fromkeys(tokenize(query))))
        if not token_ids:
            return []
        scores = self._bm25.get_scores_from_ids(token_ids)  # (N,) one score per document
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:  # keep every document scoring at least the k-th best score
            kth_best = np.partition(scores[hits], len(hits) - k)[len(hits) - k]
            hits = hits[scores[hits] >= kth_best]
        order = np.lexsort((hits, -scores[hits]))  # score descending, then position
        return hits[order][:k].tolist()

    # --- public API -----------------------------------------------------------------

    def search(self, query: str) -> list[Document]:
        """The ranked hits for `query`: tier 1, then 2, then 3, de-duplicated, at most `top_k`."""
        query = query[:MAX_QUERY_CHARS]
        ranked: dict[int, None] = {}  # document positions, in order (a dict de-duplicates)
        for tier in (self._exact_title, self._partial_title,
                     lambda q: self._content(q, self.top_k + len(ranked))):
            if len(ranked) == self.top_k:
                break
            for i in tier(query):
                ranked.setdefault(i)
                if len(ranked) == self.top_k:
                    break
        return [self.documents[i] for i in ranked]

    def format_hit(self, doc: Document) -> str:
        """One observation line: '[Title] text cut to snippet_chars…'."""
        return f"[{one_line(doc.title)}] {truncate(one_line(doc.text), self.snippet_chars)}"

    def __call__(self, query: Any) -> str:
        """Search and format the hits, one per line, in at most `max_chars`. Never raises."""
        try:
            query = query if isinstance(query, str) else str(query)
        except Exception:  # an object whose __str__ fails is treated as an empty query
            query = ""
        lines: list[str] = []
        budget = self.max_chars
        for doc in self.search(query):
            line = self.format_hit(doc)
            cost = len(line) + (1 if lines else 0)  # the joining newline
            if cost <= budget:
                lines.append(line)
                budget -= cost
                continue
            # The first hit that does not fit is cut; after the first, only if its
            # title and some text still fit.
            cut = truncate(line, budget - (1 if lines else 0))
            if not lines or len(cut) > len(one_line(doc.title)) + 3 + len(ELLIPSIS):
                lines.append(cut)
            break
        if not lines:
            return no_results(query, self.max_chars)
        return "\n".join(lines)
