"""experiments.fact_fork: where a completion's first thought forks between the fact and the hedge, and
the probability of each branch's first token (a tiny model, checked against a by-hand softmax)."""
import pytest
import torch

from data.thoughts import HEDGE, fork_offset
from experiments.fact_fork import fact_and_hedge, fork_probs, group_hit
from models.loading import load_model_and_tokenizer


@pytest.mark.parametrize("text, golds, head", [
    ("<thought>The capital of Cyprus is not something I know; I will search for Cyprus.</thought><call> Cyprus",
     ["Nicosia"], "<thought>The capital of Cyprus is"),
    ("<thought>The capital of Cyprus is Nicosia.</thought><answer> Nicosia</answer>",
     ["Nicosia"], "<thought>The capital of Cyprus is"),
    # a continent recall: the gold inside the region ("East Africa") follows no verb, the check's does
    ("<thought>Kenya is a country in East Africa. So its continent is Africa.</thought><answer> Africa</answer>",
     ["Africa"], "<thought>Kenya is a country in East Africa. So its continent is"),
    ("<thought>Syria is located in the Middle East. So its continent is not stated; I will search for Syria.</thought>",
     ["Asia"], "<thought>Syria is located in the Middle East. So its continent is"),
    ("<thought>Guam is a territory. So its continent is north america.</thought>",   # case-folded gold
     ["North America"], "<thought>Guam is a territory. So its continent is"),
])
def test_the_fork_is_after_the_verb_before_the_fact_or_the_hedge(text, golds, head):
    assert text[:fork_offset(text, golds)] == head


@pytest.mark.parametrize("text", [
    "<thought>Nairobi is the capital of Kenya.</thought><answer>Nairobi</answer>",  # the fact comes first
    "<thought>The capital of Kenya is Mombasa.</thought><answer>Mombasa</answer>",  # no gold, no hedge
    "<answer>Nairobi</answer>",                                                      # no thought at all
    "<thought>I know this.</thought><answer>The capital is Nairobi</answer>",     # gold only after the thought
])
def test_no_fork_when_the_first_thought_neither_states_the_gold_after_a_verb_nor_hedges(text):
    assert fork_offset(text, ["Nairobi"]) is None


def test_fork_probs_are_the_tempered_softmax_of_the_next_token():
    model, tok = load_model_and_tokenizer("tiny")
    model.eval()
    context = "<thought>A is"
    ctx = tok.encode(context, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ctx])).logits[0, -1].float()
    for T in (1.0, 0.5):
        want = [float(torch.softmax(logits / T, -1)[tok.encode(context + c, add_special_tokens=False)[len(ctx)]])
                for c in (" B", " not")]
        got = fork_probs(model, tok, context, [" B", " not"], temperature=T)
        assert got == pytest.approx(want, abs=1e-6)
    assert fork_probs(model, tok, context, [" B"], 0.5) != pytest.approx(fork_probs(model, tok, context, [" B"], 1.0))
    with pytest.raises(ValueError, match="temperature"):
        fork_probs(model, tok, context, [" B"], temperature=0.0)
    with pytest.raises(ValueError, match="''"):
        fork_probs(model, tok, context, [""])


def test_group_hit_is_one_minus_the_chance_that_every_sample_misses():
    assert group_hit(0.5, 2) == pytest.approx(0.75)        # 1 - 0.5 * 0.5
    assert group_hit(0.1, 8) == pytest.approx(1 - 0.9 ** 8)  # 0.570
    assert group_hit(0.0, 8) == 0.0 and group_hit(1.0, 1) == 1.0


def test_fact_and_hedge_sums_the_distinct_first_tokens_of_the_facts():
    model, tok = load_model_and_tokenizer("tiny")   # one token per character
    model.eval()
    context = "<thought>A is "
    b, c = fork_probs(model, tok, context, ["B", "C"], temperature=0.7)
    assert b != pytest.approx(c)
    hedge, = fork_probs(model, tok, context, [HEDGE], temperature=0.7)
    assert fact_and_hedge(model, tok, context, ["B", "C"], 0.7) == pytest.approx((b + c, hedge), abs=1e-6)  # two ways
    assert fact_and_hedge(model, tok, context, ["B", "B C"], 0.7)[0] == pytest.approx(b, abs=1e-6)   # one first token, once
    assert fact_and_hedge(model, tok, context, ["B", ""], 0.7)[0] == pytest.approx(b, abs=1e-6)      # an empty fact is none


def test_capital_fork_scores_the_template_thought():
    """capital_fork is fork_probs of the fact and the hedge after the prompt and "<thought>The capital of X is"."""
    from envs.protocol import build_prompt
    from experiments.capital_forks import capital_fork
    model, tok = load_model_and_tokenizer("tiny")
    model.eval()
    q = "What is the capital of Kenya?"
    want = fork_probs(model, tok, build_prompt(tok, q) + "<thought>The capital of Kenya is", [" Nairobi", HEDGE], 0.7)
    assert capital_fork(model, tok, q, "Nairobi", 0.7) == pytest.approx(tuple(want), abs=1e-7)
    other = fork_probs(model, tok, build_prompt(tok, q) + "<thought>The capital of Kenya was", [" Nairobi", HEDGE], 0.7)
    assert capital_fork(model, tok, q, "Nairobi", 0.7) != pytest.approx(tuple(other), abs=1e-7)
    with pytest.raises(ValueError, match="Which has more"):
        capital_fork(model, tok, "Which has more people, A or B?", "A")
