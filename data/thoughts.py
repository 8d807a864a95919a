"""What the cold-start traces think before they answer or search (`data.traces` builds the traces).

Direct thoughts (`direct_thought`): "recall" (default) states the fact in the base model's own
words before the short answer: its closed-book greedy reply (`data/smollm2_memory.json`, written
by `python -m experiments.measure_memory`) cut to the first sentence, and within it to the clause,
that holds the gold; a template sentence ("The capital of Kenya is Nairobi.") when there is no
usable reply. The model then recalls a fact the way it knows it ("The capital of Greece is
Athens.") instead of being cut off from it by a bare `<answer>` (SFT on "I know this." traces
made SmolLM2 answer Greece -> "Macedonia"). "plain" gives the old "I know this." thoughts.

Search thoughts on capitals/continents the model does not know (`unknown_thought`): "hedge"
starts like a recall and gives up where the fact would come ("The capital of Uganda is
not something I know; I will search for Uganda."), so that both branches share a prefix and fork
at the fact token, where the model's own confidence lives: a known capital's name outweighs "not",
an unknown one's probability is spread over many names. "plain" gives them the generic search
thoughts (SEARCH_THOUGHTS), which fork at the thought's first token, before the model has recalled
anything.
"hedge-all" (default) also hedges every other one-hop search at its fact ("The population of Kenya
is not something I know; I will search for Kenya."): GRPO from "hedge" drifted to searching known
capitals through the generic first-token fork that every lookup reinforces, while from "hedge-all",
where no such fork is left, it kept answering what the model knows (results/economy/experiments.md).
Recall, then search (`recall_search`): a search of a continent the model does not know whose
closed-book reply names no continent starts with that reply's first clause and says so ("<thought>
Guadeloupe is a French island located in the Atlantic Ocean. That does not say which continent; I
will search for Guadeloupe.</thought>"): GRPO's policies recalled such a sentence for a territory and
then guessed a continent; here the fork comes after the recall, where the model can see what its
recall did not state.
The continent check (`data.traces.check_continent`, `--continent-check`): every continent recall ends
with the same clause, "So its continent is Africa." on a direct trace, "So its continent is not stated;
I will search for Syria." after a recall-search one's region, so the branches fork at the fact token again.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

from data.answers import contains_gold
from data.offline_task import DEFAULT_MEMORY_FILE, MEMORY_TYPES, read_memory_json
from data.types import LOOKUP, MEMORY, QAExample

DEFAULT_UNKNOWN_THOUGHT = "hedge-all"  # every one-hop search hedges at its fact (HEDGED_SEARCHES below)
DIRECT_THOUGHT_STYLES = ("recall", "plain")
MISS_THOUGHT = "The search found nothing, so I answer from memory. {recall}"  # after a missed search
MAX_RECALL_WORDS = 25          # a longer own-words sentence falls back to the template

# Thought templates, one picked per example with an RNG seeded by (seed, example id).
DIRECT_THOUGHTS = ("I know this.", "I know this one.", "I know the answer.")
SEARCH_THOUGHTS = ("I need to look up {q}.", "I do not know this; I will search for {q}.",
                   "I should search for {q}.")
MULTIHOP_THOUGHTS = ("I need to look up {qs}.", "I need facts about {qs}; first {q}.")
NEXT_HOP_THOUGHTS = ("Now I need {q}.", "Next I look up {q}.")
RECALL_TEMPLATES = {"capital": "The capital of {c} is {a}.", "continent": "{c} is in {a}."}
# Hedged recall (`unknown_thought="hedge"`): the thought of a search on a capital/continent the model
# does not know starts like the recall of a known one and gives up where the fact would come.
HEDGE_TEMPLATES = {"capital": "The capital of {c} is not something I know; I will search for {c}.",
                   "continent": "{c} is a country located in a part of the world I do not know; "
                                "I will search for {c}."}
# "hedge-all": every one-hop search hedges at its fact, so no search starts with a generic thought
LOOKUP_HEDGE_TEMPLATES = {
    "population": "The population of {c} is not something I know; I will search for {c}.",
    "area": "The area of {c} is not something I know; I will search for {c}.",
    "currency": "The currency of {c} is not something I know; I will search for {c}.",
    "border": "The countries bordering {c} are not something I know; I will search for {c}.",
    "bridge": "The country whose capital is {c} is not something I know; I will search for {c}.",
}
# unknown_thought -> {type: thought} of the one-hop searches that hedge (the others: SEARCH_THOUGHTS).
# A one-hop search of a capital/continent is always one the model does not know: known ones are direct.
HEDGED_SEARCHES = {"plain": {}, "hedge": HEDGE_TEMPLATES, "hedge-all": HEDGE_TEMPLATES | LOOKUP_HEDGE_TEMPLATES}
UNKNOWN_THOUGHT_STYLES = tuple(HEDGED_SEARCHES)
# Recall, then search (`recall_search`): a search of a continent the model does not know starts with the
# model's own closed-book sentence when that names no continent, and says so before searching.
RECALL_SEARCH_TAIL = " That does not say which continent; I will search for {c}."
RECALL_SEARCH_THOUGHT = "{recall}" + RECALL_SEARCH_TAIL
# The continent check (`check_continent`): both branches end their recall with the same clause and fork
# at its fact token, the continent copied from the recall or "not" when the recall names none.
GENERAL_HEDGE = "{recall} not something I know; I will search for {title}."  # data.general_qa's searches
CONTINENT_CHECK = " So its continent is {a}."
CONTINENT_CHECK_SEARCH = " So its continent is not stated; I will search for {c}."
CONTINENT_STEMS = ("africa", "asia", "europe", "america", "oceania", "australia", "antarctica")  # "Eurasian" too


def sentences(reply: str) -> list[str]:
    """The reply split after each ".", "!" or "?" that a space follows."""
    return re.split(r"(?<=[.!?])\s+", reply.strip())


def own_words(reply: str, answers: Sequence[str], subject: str = "") -> str | None:
    """The base model's reply cut to the first sentence, and in it the first clause, that states a gold.

    "Chad is a continent located in the Eastern Africa region of the continent of Africa, which is
    bordered by ..." -> "Chad is a continent located in the Eastern Africa region of the continent
    of Africa." The gold must occur outside the first mention of `subject` (the country): "The
    capital of Singapore is not a place." does not state the capital Singapore. None when no
    sentence states a gold as whole words, or the cut one is too long or holds a tag.
    """
    def states(text: str) -> bool:
        if subject:
            text = re.sub(re.escape(subject), " ", text, count=1, flags=re.IGNORECASE)
        return contains_gold(text, answers)

    for sentence in sentences(reply):
        if not states(sentence):
            continue
        words = sentence.split()
        for end in range(1, len(words) + 1):  # the shortest prefix that states the gold...
            if states(" ".join(words[:end])):
                break
        while end < len(words) and not re.search(r"[,;.!?]$", words[end - 1]):
            end += 1  # ... carried on to the end of its clause
        cut = re.sub(r"[,;:.!?]*$", "", " ".join(words[:end])) + "."
        return cut if len(cut.split()) <= MAX_RECALL_WORDS and "<" not in cut and ">" not in cut else None
    return None


def recall_without_continent(reply: str, subject: str) -> str | None:
    """The first clause of the reply's first sentence if it is about `subject` and names no continent:
    "Guadeloupe is a French island located in the Atlantic Ocean, ..." -> "Guadeloupe is a French island
    located in the Atlantic Ocean." None when it names one (even wrongly, or as an adjective: "European"),
    does not name the subject, is shorter than 3 or longer than MAX_RECALL_WORDS words, or holds a tag."""
    sentence = sentences(reply)[0]
    clause = re.split(r"[,;:.!?](?:\s|$)", sentence)[0].strip()
    lowered = clause.lower()
    if (subject.lower() not in lowered or any(stem in lowered for stem in CONTINENT_STEMS)
            or not 3 <= len(clause.split()) <= MAX_RECALL_WORDS or "<" in clause or ">" in clause):
        return None
    return clause + "."


def recall_sentence(example: QAExample, replies: Mapping[str, str] | None = None) -> str:
    """A sentence stating the example's first gold: the model's own reply (`own_words`) if usable,
    else a template ("The capital of Kenya is Nairobi.", "Kenya is in Africa.", "The answer is X.")."""
    if replies and example.id in replies:
        subject = example.hops[0] if example.type in MEMORY_TYPES and example.hops else ""
        if sentence := own_words(replies[example.id], example.answers[:1], subject):
            return sentence
    template = RECALL_TEMPLATES.get(example.type or "", "The answer is {a}.")
    return template.format(c=example.hops[0] if example.hops else "", a=example.answers[0])


def closed_book_replies(memory_file: str | Path = DEFAULT_MEMORY_FILE) -> dict[str, str]:
    """question id -> the base model's closed-book greedy reply (empty if the file is absent)."""
    data = read_memory_json(memory_file)
    results = {} if data is None else data["results"]
    return {qid: r["greedy_reply"] for qid, r in results.items() if isinstance(r.get("greedy_reply"), str)}


def sampled_accuracies(memory_file: str | Path = DEFAULT_MEMORY_FILE) -> dict[str, float]:
    """question id -> the base model's closed-book accuracy over its sampled replies (T = 1)."""
    data = read_memory_json(memory_file, required=True)
    return {qid: float(r["sampled_accuracy"]) for qid, r in data["results"].items() if "sampled_accuracy" in r}


def demote_half_known(examples: Sequence[QAExample], sampled: Mapping[str, float],
                      min_sampled: float) -> list[QAExample]:
    """The examples with each MEMORY one whose sampled accuracy is below `min_sampled` made LOOKUP:
    its trace is then a search (hedged like an unknown capital's), not a direct answer. An example
    the measurement lacks keeps its kind. For traces only: the task's own kinds are unchanged."""
    if not 0.0 <= min_sampled <= 1.0:
        raise ValueError(f"min_sampled must be in [0, 1], got {min_sampled!r}")
    return [replace(ex, kind=LOOKUP) if ex.kind == MEMORY and sampled.get(ex.id, 1.0) < min_sampled else ex
            for ex in examples]


def direct_replies(direct_thought: str, memory_file: str | Path = DEFAULT_MEMORY_FILE) -> dict[str, str] | None:
    """The `replies` argument of `draw_traces` for a direct-thought style ("recall" or "plain")."""
    if direct_thought not in DIRECT_THOUGHT_STYLES:
        raise ValueError(f"direct_thought={direct_thought!r}: expected one of {DIRECT_THOUGHT_STYLES}")
    return closed_book_replies(memory_file) if direct_thought == "recall" else None


# Where a thought forks (experiments.fact_fork, the SFT's `fork_target`): right after the recall's verb,
# before the hedge's " not" or the fact.
HEDGE = " not"                  # the hedge's first token: "... is not something I know" / "... is not stated"
_VERB = r"(?:is|are|was|were)"  # the recall's verb right before the fork


def fork_offset(text: str, golds: Sequence[str]) -> int | None:
    """Offset in `text` of the fork of its first thought: the space before the hedge's "not" or before
    a gold answer, whichever comes first right after a verb ("The capital of Cyprus is| Nicosia",
    "So its continent is| not stated"). None when the first thought has neither there: a recall that
    states the fact first ("Nairobi is the capital of Kenya.") has no fork at the fact token."""
    start, end = text.find("<thought>"), text.find("</thought>")
    if start < 0 or end < start:
        return None
    facts = "|".join(re.escape(g) for g in golds if g)
    fork = re.compile(rf"\b{_VERB}(?= (?:not\b{'|' + facts if facts else ''}))", re.IGNORECASE)
    m = fork.search(text, start + len("<thought>"), end)
    return m.end() if m else None
