"""Synthetic SFT traces for the cold start: one assistant turn in the exact GRPO format.

SmolLM2-135M-Instruct never writes our tags zero-shot, so GRPO starts from a model fine-tuned
on traces like these (observations are real env output, shortened here):

    direct    <thought>The capital of Kenya is Nairobi.</thought><answer> Nairobi</answer>
    search    <thought>I need to look up Kenya.</thought><call> Kenya</call><obs>[Kenya] …</obs><answer> Shilling</answer>
    multihop  <thought>I need to look up Kenya and Peru.</thought><call> Kenya</call><obs>…</obs>
              <thought>Now I need Peru.</thought><call> Peru</call><obs>…</obs><answer> Kenya</answer>

A Trace is stored as segments, ("model", text) or ("obs", result), so the SFT tokenizer can
encode them apart and mask observations as `grpo.rollout` does, whose result for a query is
`run_tool(env, query)[0]`, wrapped in <obs></obs>. No EOS in the text (the tokenizer adds it).

The thoughts (what a trace thinks before it answers or searches: recall sentences, hedges, the
continent check) live in `data.thoughts`.

Styles: direct <- kind MEMORY; search <- kind LOOKUP with one hop (population, area, currency,
border, bridge, unknown capitals/continents); multihop <- kind LOOKUP with >= 2 hops (offline
comparisons; HotpotQA, hops = supporting titles). Queries are the `hops`; the answer is the
first gold. An offline search/multihop trace is skipped (counted) unless a normalized gold
occurs as whole words in its normalized observations; HotpotQA traces (`verify_gold=False`)
are kept and only counted (snippets are cut; yes/no answers never occur). A trace that fails
`parse_completion(text).well_formed`, or whose calls differ from the hops, is skipped (counted).

The slots (`ANSWER`, `CALL`): a space after `<answer>` and after `<call>`. In SmolLM2's tokenizer a
word after a space is one word-initial token (" Athens", " Latvia"), the token the thought or the
observation holds; right after `>` the same word is spelled in other pieces ("At" + "hens", "Lat" +
"via"), so a bare slot makes the model re-spell what it copies, and it failed exactly there (Greece ->
"Tokyo", Philippines -> "M Manila"; searches for "Latgae", "Bahamina"). With the space in the answer
one cold start bound every held-out memory question to its thought and misread fewer observations
(results/economy/experiments.md, "The answer slot spells the fact in other tokens"). The parser and the
rollout strip the spaces. `bare(trace, tags)` (CLI `--bare answer call`) drops them: every result
before that section was trained with both slots bare; its spaced-answer runs with `call` bare.

Drawing: counts per style = n * mix by largest remainder (summing to n). Each style draws from
its eligible examples sorted by id and shuffled by a string-seeded RNG (no hash(): the same
list in every process). A style short of examples gives what it has, warns, and the other
styles with a positive share fill its remainder, largest share first. The result is shuffled.
With `unknown_share` > 0, that share of the search count comes first from the capital/continent
questions the model does NOT know (kind LOOKUP), the rest from all remaining one-hop lookups, so
that the type of a question does not decide between answering and searching ("capital ->
answer"); knowing does.
Missed searches (`miss_share`): that share of the searches of capitals/continents the model does
not know get the observation of a search that finds nothing ("No results for 'Uganda'.", as a
tool that fails or does not cover the question returns) and go on to answer from memory, with the
recall sentence: "<thought>The search found nothing, so I answer from memory. The capital of Uganda
is Kampala.</thought><answer> Kampala</answer>" (ids "miss/<example id>", style "search"). Without
them no trace ever sees an empty search, and out of the tool's domain GRPO's policy searched again
and again until the call budget ran out (results/economy/experiments.md, probe).
General knowledge (`--general-memory`, `data.general_qa`): one trace per training question of that
second domain on top of the n, direct where the base model knows it, else a hedged search
(`general_trace`).
Run `python -m data.traces --out outputs/traces.jsonl [--hotpotqa PATH]`.
"""
from __future__ import annotations

import argparse
import json
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from itertools import islice
from typing import Iterator, Mapping, Sequence

from data.answers import contains_gold
from data import general_qa
from data.files import atomic_write, iter_json_lines
from data.hotpotqa import hotpotqa_documents, load_hotpotqa
from data.offline_task import MEMORY_TYPES, build_offline_task
from data.thoughts import (CONTINENT_CHECK, CONTINENT_CHECK_SEARCH, DEFAULT_UNKNOWN_THOUGHT, DIRECT_THOUGHT_STYLES,
                           DIRECT_THOUGHTS, GENERAL_HEDGE, HEDGED_SEARCHES, MISS_THOUGHT, MULTIHOP_THOUGHTS,
                           NEXT_HOP_THOUGHTS, RECALL_SEARCH_TAIL, RECALL_SEARCH_THOUGHT, SEARCH_THOUGHTS,
                           UNKNOWN_THOUGHT_STYLES, demote_half_known, direct_replies, recall_sentence,
                           recall_without_continent, sampled_accuracies)
from data.types import LOOKUP, MEMORY, QAExample
from envs.protocol import observation_text, parse_completion
from envs.sandbox import run_tool
from envs.search import LocalSearchEnv, no_results

STYLES = ("direct", "search", "multihop")
ROLES = ("model", "obs")
DEFAULT_MIX = (0.3, 0.5, 0.2)  # shares of direct, search, multihop
DEFAULT_UNKNOWN_SHARE = 0.4    # of the search traces: capitals/continents the model does not know
ANSWER = "<answer> {a}</answer>"  # the slots: a space after the tag (module docstring)
CALL = "<call> {q}</call>"
SLOTS = ("answer", "call")  # the tags `bare` can leave without that space


# --------------------------------------------------------------------------- the record

@dataclass(frozen=True)
class Trace:
    id: str                                  # "<style>/<example id>" ("miss/<example id>": a missed search)
    question: str
    answers: tuple[str, ...]                 # every gold answer; the trace answers answers[0]
    kind: str                                # MEMORY or LOOKUP, from the example
    style: str                               # "direct" | "search" | "multihop"
    segments: tuple[tuple[str, str], ...]    # ("model", text) or ("obs", result without tags)
    type: str | None = None                  # the example's type (HotpotQA ones: "hotpotqa/<type>")

    def __post_init__(self):
        bad = [s for s in self.segments if len(s) != 2 or s[0] not in ROLES or not isinstance(s[1], str)]
        if self.style not in STYLES or bad:
            raise ValueError(f"trace {self.id!r}: style must be one of {STYLES} (got {self.style!r}) and every "
                             f"segment a (role, text) pair with role in {ROLES} (bad: {bad[:1]})")

    @property
    def text(self) -> str:
        """The whole assistant turn as the rollout would decode it: each obs wrapped in <obs></obs>."""
        return "".join(text if role == "model" else observation_text(text) for role, text in self.segments)


@dataclass
class TraceReport:
    """What one draw dropped, and how many kept traces went unverified."""
    skipped: Counter = field(default_factory=Counter)   # "<style>: <reason>" -> examples dropped
    unverified: int = 0                                 # kept without the gold check (HotpotQA)
    unverified_with_gold: int = 0                       # ... whose observations hold a gold answer


# --------------------------------------------------------------------------- building one trace

def style_of(example: QAExample) -> str | None:
    """The style an example is eligible for (see the module docstring); None without hops."""
    if example.kind == MEMORY:
        return "direct"
    return {0: None, 1: "search"}.get(len(example.hops), "multihop")



def build_trace(example: QAExample, style: str, env, rng: random.Random,
                replies: Mapping[str, str] | None = None, unknown_thought: str = DEFAULT_UNKNOWN_THOUGHT,
                miss: bool = False, recall_search: bool = False) -> Trace:
    """The trace of one example in one style; each observation is `run_tool(env, query)[0]`.

    replies: None gives a direct trace the plain "I know this." thought; a mapping (even empty)
    gives it the recall sentence (`recall_sentence`) built from the model's own replies.
    unknown_thought: "hedge" gives a one-search trace of a capital/continent the model does not
    know the hedged recall thought (HEDGE_TEMPLATES); "plain" the generic search thoughts;
    "hedge-all" hedges every one-hop search at its fact (LOOKUP_HEDGE_TEMPLATES for the other types).
    miss: a one-search trace whose search finds nothing (`no_results`), then answers from memory
    (MISS_THOUGHT with the recall sentence); id "miss/<example id>".
    recall_search: a one-search trace of a continent whose closed-book reply (in `replies`) names no
    continent thinks that reply first, then searches (RECALL_SEARCH_THOUGHT, `recall_without_continent`);
    the other searches keep the `unknown_thought` ones.
    """
    if miss and (style != "search" or len(example.hops) != 1):
        raise ValueError(f"example {example.id!r}: only a one-search trace can miss (style {style!r}, "
                         f"{len(example.hops)} hops)")
    answer, queries = ANSWER.format(a=example.answers[0]), example.hops
    if style == "direct":
        thought = rng.choice(DIRECT_THOUGHTS) if replies is None else recall_sentence(example, replies)
        segments = [("model", f"<thought>{thought}</thought>{answer}")]
    else:
        first = SEARCH_THOUGHTS if style == "search" else MULTIHOP_THOUGHTS
        listed = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + " and " + queries[-1]
        hedged = HEDGED_SEARCHES[unknown_thought].get(example.type) if style == "search" else None
        recall = (recall_without_continent(replies.get(example.id, ""), queries[0])
                  if recall_search and replies and style == "search" and example.type == "continent" else None)
        if recall:
            thought = RECALL_SEARCH_THOUGHT.format(recall=recall, c=queries[0])
        else:
            thought = hedged.format(c=queries[0]) if hedged else rng.choice(first).format(q=queries[0], qs=listed)
        segments = [("model", f"<thought>{thought}</thought>{CALL.format(q=queries[0])}")]
        for i, query in enumerate(queries):
            segments.append(("obs", no_results(query, env.max_chars) if miss else run_tool(env, query)[0]))
            if i + 1 < len(queries):
                hop = rng.choice(NEXT_HOP_THOUGHTS).format(q=queries[i + 1])
                segments.append(("model", f"<thought>{hop}</thought>{CALL.format(q=queries[i + 1])}"))
        if miss:
            answer = f"<thought>{MISS_THOUGHT.format(recall=recall_sentence(example, replies))}</thought>{answer}"
        segments.append(("model", answer))
    return Trace(f"{'miss' if miss else style}/{example.id}", example.question, tuple(example.answers),
                 example.kind, style, tuple(segments), example.type)


def general_trace(entry: general_qa.Entry, kind: str, env) -> Trace:
    """The trace of one general-knowledge entry (`data.general_qa`): if `kind` is memory, its recall
    completed by the fact ("The author of Faust is Johann Wolfgang von Goethe."), else the recall given
    up at the fact and a search for its title (GENERAL_HEDGE); the observation is `run_tool(env, title)[0]`."""
    answer = ANSWER.format(a=entry.answers[0])
    if kind == MEMORY:
        style, segments = "direct", (("model", f"<thought>{entry.recall} {entry.answers[0]}.</thought>{answer}"),)
    else:
        thought = GENERAL_HEDGE.format(recall=entry.recall, title=entry.title)
        style = "search"
        segments = (("model", f"<thought>{thought}</thought>{CALL.format(q=entry.title)}"),
                    ("obs", run_tool(env, entry.title)[0]), ("model", answer))
    return Trace(f"{style}/general/{entry.title}", entry.question, tuple(entry.answers), kind, style, segments,
                 entry.type)


def bare(trace: Trace, tags: Sequence[str] = SLOTS) -> Trace:
    """The trace with no space after `<tag>` for each of `tags` (the older formats); observations untouched."""
    if unknown := [t for t in tags if t not in SLOTS]:
        raise ValueError(f"bare: unknown slot {unknown[0]!r}, expected one of {SLOTS}")

    def unspaced(text: str) -> str:
        for tag in tags:
            text = text.replace(f"<{tag}> ", f"<{tag}>")
        return text
    return replace(trace, segments=tuple((role, unspaced(text) if role == "model" else text)
                                         for role, text in trace.segments))


def check_continent(trace: Trace) -> Trace:
    """The trace with its continent recall checked in the same words on both branches (CLI `--continent-check`).

    A direct continent trace's thought gets CONTINENT_CHECK after its recall ("Kenya is a country located
    in East Africa. So its continent is Africa."); a recall-search one's "That does not say which
    continent; ..." becomes CONTINENT_CHECK_SEARCH ("Syria is located in the Middle East. So its continent
    is not stated; I will search for Syria."). The branches then share a prefix up to the fact token, where
    the model copies a continent its recall named or has none to copy: the recall-search cold start answered
    a region recall directly ("Syria is located in the Middle East" -> "Africa") because its fork came
    one clause after the recall, at a token that does not look at it. Other traces are returned unchanged.
    """
    if trace.type != "continent" or trace.style not in ("direct", "search"):
        return trace
    role, text = trace.segments[0]
    end = text.find("</thought>")
    if trace.style == "direct" and end > 0:
        text = text[:end] + CONTINENT_CHECK.format(a=trace.answers[0]) + text[end:]
    elif trace.style == "search":
        country = parse_completion(trace.text).calls[0]
        tail = RECALL_SEARCH_TAIL.format(c=country) + "</thought>"
        if tail not in text:
            return trace  # a hedged search that recalled nothing: it forks before any recall
        text = text.replace(tail, CONTINENT_CHECK_SEARCH.format(c=country) + "</thought>", 1)
    return replace(trace, segments=((role, text),) + trace.segments[1:])


def check_trace(trace: Trace, queries: Sequence[str]) -> str:
    """'' if the text is well-formed, calls exactly `queries` and answers answers[0]; else why not."""
    parsed = parse_completion(trace.text)
    if not parsed.well_formed:
        return f"malformed ({parsed.reason})"
    if parsed.calls != tuple(q.strip() for q in queries):
        return "calls differ from the hops"
    return "" if parsed.answer == trace.answers[0].strip() else "answer differs from the first gold"


# --------------------------------------------------------------------------- drawing

def quotas(n: int, mix: Sequence[float]) -> dict[str, int]:
    """style -> n * share, rounded by largest remainder so that the counts sum to n."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if len(mix) != len(STYLES) or any(s < 0 for s in mix) or sum(mix) <= 0:
        raise ValueError(f"mix must be {len(STYLES)} shares >= 0 of {STYLES} with a positive sum, got {tuple(mix)}")
    exact = [n * s / sum(mix) for s in mix]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(STYLES)), key=lambda i: (counts[i] - exact[i], i))[:n - sum(counts)]:
        counts[i] += 1
    return dict(zip(STYLES, counts))


def _valid_traces(pool: list[QAExample], style: str, env, seed: int, verify_gold: bool, report: TraceReport,
                  replies: Mapping[str, str] | None = None, unknown_thought: str = DEFAULT_UNKNOWN_THOUGHT,
                  recall_search: bool = False) -> Iterator[Trace]:
    """The traces of `pool` in order, skipping (and counting) the ones that fail a check."""
    for ex in pool:
        trace = build_trace(ex, style, env, random.Random(f"{seed}/{ex.id}"), replies, unknown_thought,
                            recall_search=recall_search)
        problem = check_trace(trace, ex.hops if style != "direct" else ())
        observed = " ".join(text for role, text in trace.segments if role == "obs")
        if not problem and style != "direct":
            if verify_gold and not contains_gold(observed, ex.answers):
                problem = "gold not in the observations"
            elif not verify_gold:
                report.unverified += 1
                report.unverified_with_gold += contains_gold(observed, ex.answers)
        if problem:
            report.skipped[f"{style}: {problem}"] += 1
        else:
            yield trace


def unknown_memory(example: QAExample) -> bool:
    """A capital/continent question the model was measured NOT to know (kind LOOKUP)."""
    return example.kind != MEMORY and example.type in MEMORY_TYPES


def draw_traces(examples: Sequence[QAExample], env, counts: dict[str, int], seed: int = 0,
                verify_gold: bool = True, fill: bool = True, replies: Mapping[str, str] | None = None,
                unknown_share: float = DEFAULT_UNKNOWN_SHARE, unknown_thought: str = DEFAULT_UNKNOWN_THOUGHT,
                miss_share: float = 0.0, recall_search: bool = False) -> tuple[list[Trace], TraceReport]:
    """Up to counts[style] traces per style (see the module docstring) and what was skipped.

    fill: a short style's remainder is drawn from the other styles with a positive count.
    replies: the model's closed-book replies for recall thoughts (None: plain "I know this.").
    unknown_share: this share of counts["search"] is drawn first from the capital/continent
        questions the model does not know (0: the search pool is drawn uniformly).
    unknown_thought: "hedge", "plain" or "hedge-all", the thought of the searches (module docstring).
    miss_share: this share of the drawn searches of unknown capitals/continents (in draw order) miss.
    recall_search: searches of continents start from the model's reply when it names none (`build_trace`).
    """
    for name, share in (("unknown_share", unknown_share), ("miss_share", miss_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {share!r}")
    if unknown_thought not in UNKNOWN_THOUGHT_STYLES:
        raise ValueError(f"unknown_thought={unknown_thought!r}: expected one of {UNKNOWN_THOUGHT_STYLES}")
    if recall_search and replies is None:
        raise ValueError("recall_search needs the model's closed-book replies (direct_thought='recall')")
    report = TraceReport()
    eligible = sorted((ex for ex in examples if style_of(ex)), key=lambda e: e.id)
    sources = {}
    for style in STYLES:
        pool = [ex for ex in eligible if style_of(ex) == style]
        random.Random(f"{seed}/{style}").shuffle(pool)
        if style == "search" and unknown_share > 0:  # k unknown capitals/continents first, then the rest
            k = round(unknown_share * counts.get("search", 0))
            first = [ex for ex in pool if unknown_memory(ex)][:k]
            pool = first + [ex for ex in pool if ex not in first]
        sources[style] = _valid_traces(pool, style, env, seed, verify_gold, report, replies, unknown_thought,
                                       recall_search)
    out = {style: list(islice(sources[style], counts.get(style, 0))) for style in STYLES}
    shortfall = sum(counts.values()) - sum(map(len, out.values()))
    for style in STYLES:
        if len(out[style]) < counts.get(style, 0):
            then = "; filling from the other styles" if fill else ""
            warnings.warn(f"only {len(out[style])} {style} traces of the {counts[style]} requested (too few "
                          f"eligible examples pass the checks){then}", stacklevel=2)
    for style in sorted((s for s in STYLES if fill and counts.get(s, 0) > 0), key=lambda s: -counts[s]):
        extra = list(islice(sources[style], shortfall))
        out[style] += extra
        shortfall -= len(extra)
    if fill and shortfall:
        warnings.warn(f"{shortfall} traces short of the {sum(counts.values())} requested", stacklevel=2)
    by_id = {ex.id: ex for ex in eligible}
    searched = [by_id[t.id.split("/", 1)[1]] for t in out["search"]]  # the example of each search trace
    unknown = [i for i, ex in enumerate(searched) if unknown_memory(ex)]
    for i in unknown[:round(miss_share * len(unknown))]:
        out["search"][i] = build_trace(searched[i], "search", env, random.Random(f"{seed}/{searched[i].id}"),
                                       replies, unknown_thought, miss=True, recall_search=recall_search)
    traces = [t for style in STYLES for t in out[style]]
    random.Random(f"{seed}/order").shuffle(traces)
    return traces, report


def make_traces(examples: Sequence[QAExample], env, n: int = 500, mix: Sequence[float] = DEFAULT_MIX,
                seed: int = 0, verify_gold: bool = True, direct_thought: str = "recall",
                unknown_share: float = DEFAULT_UNKNOWN_SHARE, unknown_thought: str = DEFAULT_UNKNOWN_THOUGHT,
                miss_share: float = 0.0, recall_search: bool = False) -> list[Trace]:
    """n traces, shares `mix` of (direct, search, multihop); same seed -> same list."""
    return draw_traces(examples, env, quotas(n, mix), seed, verify_gold, replies=direct_replies(direct_thought),
                       unknown_share=unknown_share, unknown_thought=unknown_thought, miss_share=miss_share,
                       recall_search=recall_search)[0]


def offline_traces(n: int = 500, mix: Sequence[float] = DEFAULT_MIX, seed: int = 0, split: str = "train",
                   task_seed: int | None = None, direct_thought: str = "recall",
                   unknown_share: float = DEFAULT_UNKNOWN_SHARE, unknown_thought: str = DEFAULT_UNKNOWN_THOUGHT) -> list[Trace]:
    """Traces of one offline split. `task_seed` (default: `seed`) seeds the splits: it must equal the
    GRPO run's data.seed, so that SFT never sees a validation or test question."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split={split!r}: expected 'train', 'validation' or 'test'")
    task = build_offline_task(seed if task_seed is None else task_seed)
    return make_traces(getattr(task, split), LocalSearchEnv(task.documents), n, mix, seed,
                       direct_thought=direct_thought, unknown_share=unknown_share, unknown_thought=unknown_thought)


def _draw_hotpotqa(path: str, n: int, seed: int) -> tuple[list[Trace], TraceReport]:
    """Up to n multihop traces, ids "multihop/hotpotqa/<id>", types "hotpotqa/<type>"."""
    examples = load_hotpotqa(path)
    env = LocalSearchEnv(hotpotqa_documents(examples))
    traces, report = draw_traces(examples, env, {"multihop": n}, seed, verify_gold=False, fill=False)
    return [replace(t, id=f"multihop/hotpotqa/{t.id.split('/', 1)[1]}", type=f"hotpotqa/{t.type}")
            for t in traces], report


def hotpotqa_traces(path: str, n: int, seed: int = 0) -> list[Trace]:
    """n multihop traces from a HotpotQA file, over an env indexing the paragraphs of its examples."""
    return _draw_hotpotqa(path, n, seed)[0]


# --------------------------------------------------------------------------- JSONL files

REQUIRED_FIELDS = ("id", "question", "answers", "kind", "style", "segments")


def write_traces(traces: Sequence[Trace], path: str | Path) -> None:
    """One JSON object per line; "text" is for people (`read_traces` checks it against the segments)."""
    rows = [{"id": t.id, "style": t.style, "kind": t.kind, "type": t.type, "question": t.question,
             "answers": list(t.answers), "text": t.text, "segments": [list(s) for s in t.segments]} for t in traces]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _from_dict(row, where: str) -> Trace:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if missing := [name for name in REQUIRED_FIELDS if name not in row]:
        raise ValueError(f"{where}: missing field {missing[0]!r}")
    answers, segments = row["answers"], row["segments"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: field 'answers': expected a non-empty list of strings")
    if not isinstance(segments, list) or not all(isinstance(s, list) and len(s) == 2 for s in segments):
        raise ValueError(f"{where}: field 'segments': expected a list of [role, text] pairs")
    try:
        trace = Trace(str(row["id"]), row["question"], tuple(answers), row["kind"], row["style"],
                      tuple(map(tuple, segments)), row.get("type"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    if "text" in row and row["text"] != trace.text:
        raise ValueError(f"{where}: field 'text' does not match field 'segments'")
    return trace


def read_traces(path: str | Path) -> list[Trace]:
    """Traces from a `write_traces` file; a bad line raises ValueError naming the file, line and field."""
    return [_from_dict(row, where) for row, where in iter_json_lines(path)]


# --------------------------------------------------------------------------- command line

def cli_traces(n: int, mix: Sequence[float], seed: int, task_seed: int | None = None, hotpotqa: str | None = None,
               hotpotqa_share: float = 0.5, direct_thought: str = "recall",
               unknown_share: float = DEFAULT_UNKNOWN_SHARE, unknown_thought: str = DEFAULT_UNKNOWN_THOUGHT,
               miss_share: float = 0.0, direct_min_sampled: float = 0.0,
               recall_search: bool = False, general_memory: str | None = None) -> tuple[list[Trace], list[TraceReport]]:
    """Offline train traces; with `hotpotqa`, that file gives `hotpotqa_share` of the multihop count
    (fewer if it is short) and offline comparisons the rest. Each source keeps its own env: the
    one its GRPO run searches. direct_min_sampled > 0: `demote_half_known` first. With
    `general_memory` (a `measure_memory` file of `data.general_qa`'s questions), one trace per
    training entry of that domain is added on top of the n (`general_trace`), its searches run over
    the countries and the general documents together (`data.datamodule`'s `general_docs`)."""
    counts = quotas(n, mix)
    hp, reports = [], []
    if hotpotqa:
        hp, report = _draw_hotpotqa(hotpotqa, round(counts["multihop"] * hotpotqa_share), seed)
        counts["multihop"] -= len(hp)
        reports.append(report)
    task = build_offline_task(seed if task_seed is None else task_seed)
    train = demote_half_known(task.train, sampled_accuracies(), direct_min_sampled) if direct_min_sampled else task.train
    offline, report = draw_traces(train, LocalSearchEnv(task.documents), counts, seed,
                                  replies=direct_replies(direct_thought), unknown_share=unknown_share,
                                  unknown_thought=unknown_thought, miss_share=miss_share, recall_search=recall_search)
    traces = hp + offline
    if general_memory:
        kinds = general_qa.kinds_from_memory(general_memory)
        env = LocalSearchEnv(task.documents + general_qa.documents())
        traces += [general_trace(e, kinds.get(f"general/{e.title}", LOOKUP), env) for e in general_qa.entries("train")]
    random.Random(f"{seed}/mixed").shuffle(traces)
    return traces, reports + [report]


def summarize(traces: Sequence[Trace], reports: Sequence[TraceReport]) -> str:
    by = Counter((t.style, t.kind, t.type) for t in traces)
    lines = [f"{len(traces)} traces: " + ", ".join(f"{s} {sum(t.style == s for t in traces)}" for s in STYLES)
             + f" (of which missed searches {sum(t.id.startswith('miss/') for t in traces)})",
             f"{'style':<10}{'kind':<8}{'type':<22}{'count':>6}"]
    lines += [f"{s:<10}{k:<8}{str(ty):<22}{c:>6}" for (s, k, ty), c in sorted(by.items(), key=str)]
    skipped = sum((r.skipped for r in reports), Counter())
    lines.append("skipped: " + (", ".join(f"{why}: {c}" for why, c in sorted(skipped.items())) or "none"))
    unverified = sum(r.unverified for r in reports)
    if unverified:
        lines.append(f"HotpotQA (kept unverified): {sum(r.unverified_with_gold for r in reports)} of "
                     f"{unverified} have a gold answer in their observations")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write SFT cold-start traces (JSONL).")
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--n", type=int, default=500, help="number of traces")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw and the templates")
    parser.add_argument("--task-seed", type=int, default=None, help="split seed, = GRPO data.seed (default: --seed)")
    parser.add_argument("--mix", type=float, nargs=3, default=DEFAULT_MIX, metavar=("DIRECT", "SEARCH", "MULTIHOP"))
    parser.add_argument("--hotpotqa", default=None, help="HotpotQA .json/.jsonl mixed into the multihop share")
    parser.add_argument("--hotpotqa-share", type=float, default=0.5, help="part of the multihop share from HotpotQA")
    parser.add_argument("--direct-thought", choices=DIRECT_THOUGHT_STYLES, default="recall",
                        help="recall: the direct thought states the fact in the model's own words; plain: 'I know this.'")
    parser.add_argument("--unknown-share", type=float, default=DEFAULT_UNKNOWN_SHARE,
                        help="share of the search traces on capitals/continents the model does not know")
    parser.add_argument("--unknown-thought", choices=UNKNOWN_THOUGHT_STYLES, default=DEFAULT_UNKNOWN_THOUGHT,
                        help="hedge: those searches start like a recall and give up at the fact; plain: generic; "
                             "hedge-all: every one-hop search hedges at its fact")
    parser.add_argument("--miss-share", type=float, default=0.0,
                        help="share of the searches of unknown capitals/continents that find nothing and "
                             "answer from memory")
    parser.add_argument("--direct-min-sampled", type=float, default=0.0,
                        help="direct traces only for questions the base model answers right at least this "
                             "often when sampled (T = 1); the others get hedged searches")
    parser.add_argument("--recall-search", action="store_true",
                        help="searches of continents the model does not know start from its own closed-book "
                             "sentence when that names no continent ('... located in the Atlantic Ocean. That "
                             "does not say which continent; I will search for ...')")
    parser.add_argument("--continent-check", action="store_true",
                        help="continent recalls end with 'So its continent is <it>.' or, with --recall-search, "
                             "'So its continent is not stated; I will search for ...' (check_continent)")
    parser.add_argument("--general-memory", default=None,
                        help="add a trace per training question of data.general_qa, labelled by this "
                             "measure_memory file (known: direct, else a hedged search)")
    parser.add_argument("--bare", nargs="+", choices=SLOTS, default=(),
                        help="no space after these tags: 'answer call' is the format of every result before "
                             "the spaced answers (results/economy/experiments.md), 'call' that of the spaced-answer runs")
    args = parser.parse_args(argv)
    if not 0 <= args.hotpotqa_share <= 1:
        parser.error(f"--hotpotqa-share must be in [0, 1], got {args.hotpotqa_share}")
    try:
        traces, reports = cli_traces(args.n, args.mix, args.seed, args.task_seed, args.hotpotqa, args.hotpotqa_share,
                                     args.direct_thought, args.unknown_share, args.unknown_thought, args.miss_share,
                                     args.direct_min_sampled, args.recall_search, args.general_memory)
    except ValueError as err:
        parser.error(str(err))
    if args.continent_check:
        traces = [check_continent(t) for t in traces]
    if args.bare:
        traces = [bare(t, args.bare) for t in traces]
    write_traces(traces, args.out)
    print(summarize(traces, reports))
    for style in STYLES:
        sample = next((t for t in traces if t.style == style), None)
        if sample is not None:
            print(f"\nsample {sample.id}\nQ: {sample.question}\n{sample.text}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
