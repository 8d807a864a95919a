"""Latency of `LocalSearchEnv` on 10,000 documents (a script, not a test).

The collection is the HotpotQA paragraphs of `/work/shared/data/hotpotqa/dev_distractor_400.jsonl`
(when the file exists), topped up to 10,000 with synthetic documents generated from a
seed: titles of 1-4 invented words (some with "The" or a "(film)" suffix, a few
duplicated) and 3-6 sentences drawn from a Zipf-like vocabulary.

Queries, 500 of each kind, aimed at one tier each:
    exact    a title, case and punctuation changed              (tier 1)
    partial  part of a multi-word title, or a title in a question (tier 2)
    content  3 words from the middle of a document's text         (tier 3)
    unknown  invented words in no document                        (no results)

Prints the build time, then the median and p95 query time (ms) per kind and overall.

    .venv/bin/python benchmarks/search_latency.py [--docs 10000] [--seed 0] [--no-hotpotqa]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from envs.base import Document  # noqa: E402
from envs.search import LocalSearchEnv  # noqa: E402

HOTPOTQA = Path("/work/shared/data/hotpotqa/dev_distractor_400.jsonl")
SYLLABLES = "ka lo mi ra ven tor sul bri an el dor ith mar gon pe la sa qui rho zan".split()
QUERIES_PER_KIND = 500


def invented_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def hotpotqa_documents(path: Path) -> list[Document]:
    """Distinct (title, paragraph) pairs of the file's `context` fields."""
    seen: dict[tuple[str, str], None] = {}
    with path.open() as f:
        for line in f:
            for title, sentences in json.loads(line)["context"]:
                seen.setdefault((title, "".join(sentences).strip()))
    return [Document(title, text) for title, text in seen]


def synthetic_documents(n: int, rng: random.Random) -> list[Document]:
    """`n` documents with invented titles and Zipf-distributed words."""
    vocab = [invented_word(rng) for _ in range(8000)]
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    docs: list[Document] = []
    for _ in range(n):
        if docs and rng.random() < 0.01:  # a few duplicated titles
            title = rng.choice(docs).title
        else:
            title = " ".join(invented_word(rng).capitalize() for _ in range(rng.randint(1, 4)))
            title = ("The " if rng.random() < 0.1 else "") + title
            title += " (film)" if rng.random() < 0.05 else ""
        sentences = [
            " ".join(rng.choices(vocab, weights, k=rng.randint(8, 20))).capitalize() + "."
            for _ in range(rng.randint(3, 6))
        ]
        docs.append(Document(title, f"{title} is " + " ".join(sentences)))
    return docs


def make_queries(docs: list[Document], rng: random.Random) -> dict[str, list[str]]:
    multi_word = [d.title for d in docs if len(d.title.split()) >= 2]
    queries: dict[str, list[str]] = {"exact": [], "partial": [], "content": [], "unknown": []}
    for _ in range(QUERIES_PER_KIND):
        title = rng.choice(docs).title
        queries["exact"].append(rng.choice([title.upper(), title.lower(), f"{title}?", title]))
        words = rng.choice(multi_word).split()
        queries["partial"].append(
            " ".join(words[1:]) if rng.random() < 0.5 else f"Who or what is {' '.join(words)}?"
        )
        text_words = rng.choice(docs).text.split()
        start = rng.randrange(max(1, len(text_words) - 3))
        queries["content"].append(" ".join(text_words[start:start + 3]))
        queries["unknown"].append(" ".join("zz" + invented_word(rng) for _ in range(rng.randint(1, 3))))
    return queries


def percentile_ms(times: list[float], q: float) -> float:
    return 1000 * sorted(times)[min(len(times) - 1, int(q * len(times)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000, help="collection size")
    parser.add_argument("--seed", type=int, default=0, help="seed of documents and queries")
    parser.add_argument("--no-hotpotqa", action="store_true", help="synthetic documents only")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    docs = [] if args.no_hotpotqa or not HOTPOTQA.exists() else hotpotqa_documents(HOTPOTQA)
    docs = docs[: args.docs]
    n_real = len(docs)
    docs += synthetic_documents(args.docs - n_real, rng)

    start = time.perf_counter()
    env = LocalSearchEnv(docs)
    build_s = time.perf_counter() - start
    print(f"documents: {len(docs)} ({n_real} HotpotQA, {len(docs) - n_real} synthetic)")
    print(f"build: {build_s:.2f} s")

    queries = make_queries(docs, rng)
    for warmup in queries["content"][:20]:
        env(warmup)
    all_times: list[float] = []
    print(f"{'queries':<10}{'n':>6}{'median ms':>12}{'p95 ms':>10}{'no results':>12}")
    for kind, batch in queries.items():
        times, empty = [], 0
        for query in batch:
            start = time.perf_counter()
            observation = env(query)
            times.append(time.perf_counter() - start)
            empty += observation.startswith("No results")
        all_times += times
        print(f"{kind:<10}{len(times):>6}{statistics.median(times) * 1000:>12.3f}"
              f"{percentile_ms(times, 0.95):>10.3f}{empty:>12}")
    print(f"{'overall':<10}{len(all_times):>6}{statistics.median(all_times) * 1000:>12.3f}"
          f"{percentile_ms(all_times, 0.95):>10.3f}")


if __name__ == "__main__":
    main()
