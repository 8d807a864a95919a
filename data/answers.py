"""Answer metrics: HotpotQA normalisation, exact match, token F1, and a gold found inside a text.

One deviation from the official script: accents are folded before anything else ("San José" ->
"san jose"), because the offline task's golds are GeoNames' ASCII names ("San Jose", "Bogota")
while the model answers from memory in its own spelling; without it a right direct answer was
judged wrong (and rewarded as wrong) whenever the name has an accent, and a search, whose
observation spells it the ASCII way, looked better than it is. On HotpotQA it only changes answers
that differ from a gold by accents alone.

Pure Python. EM and F1 judge a final answer (the rewards, the evaluation, the tool metrics);
`contains_gold` judges free text (a closed-book reply, a thought, an observation).

References
- HotpotQA official evaluation script `hotpot_evaluate_v1.py` (Yang et al. 2018): answer
  normalisation, exact match, token F1 with its yes/no/noanswer special case.
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Sequence

from envs.protocol import END_OF_TEXT_MARKERS

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def fold_accents(s: str) -> str:
    """Compatibility decomposition (NFKD), combining marks dropped: "José" -> "Jose", "km²" -> "km2"."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", s) if not unicodedata.combining(ch))


def normalize_answer(s: str) -> str:
    """HotpotQA normalisation: lower-case, drop punctuation, drop a/an/the, collapse whitespace;
    accents folded first (`fold_accents`, the module's one deviation from the official script).

    Punctuation is deleted, not replaced by a space ("Eiffel-Tower" -> "eiffeltower"), exactly as
    in the official script.
    """
    s = "".join(ch for ch in fold_accents(s).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """EM = max over golds g of [normalize(prediction) == normalize(g)]; 0.0 if golds is empty."""
    pred = normalize_answer(prediction)
    return max((float(pred == normalize_answer(g)) for g in golds), default=0.0)


def _f1_one(pred: str, gold: str) -> float:
    # Official special case: a yes/no/noanswer answer gets no partial credit.
    if (pred in ("yes", "no", "noanswer") or gold in ("yes", "no", "noanswer")) and pred != gold:
        return 0.0
    pred_tokens, gold_tokens = pred.split(), gold.split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_tokens), num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token F1 = max over golds of 2PR/(P+R), P = |common|/|pred|, R = |common|/|gold|.

    Tokens are whitespace-split normalised answers; common is the multiset intersection. If the
    normalised prediction or gold is yes/no/noanswer and they differ, F1 = 0 (official rule).
    """
    pred = normalize_answer(prediction)
    return max((_f1_one(pred, normalize_answer(g)) for g in golds), default=0.0)


def contains_gold(text: str, golds: Sequence[str]) -> bool:
    """A normalized gold occurs as whole words in the normalized text: " g " in " normalize(text) ".

    End-of-text markers are replaced by a space first, so that one glued to the text
    ("Kabul.<|im_end|>") does not become part of the last word. A gold that normalizes to ""
    never matches. One test for the closed-book judge (`experiments.measure_memory`) and the
    trace checks (`data.traces`).
    """
    for marker in END_OF_TEXT_MARKERS:
        text = text.replace(marker, " ")
    haystack = f" {normalize_answer(text)} "
    return any(f" {g} " in haystack for g in map(normalize_answer, golds) if g)
