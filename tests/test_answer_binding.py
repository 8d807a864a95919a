"""experiments.answer_binding: which wrong direct answers contradict their own thought, and the
log-prob of an answer after a context (a tiny model, checked against a by-hand chain rule)."""
import pytest
import torch

from data.types import MEMORY, QAExample
from envs.protocol import build_prompt
from experiments.answer_binding import answer_logprob, answer_slot, contradictions, forced_recall_context, greedy_answers
from models.loading import load_model_and_tokenizer

Q_MZ, Q_CR, Q_KE = "What is the capital of Mozambique?", "What is the capital of Costa Rica?", "What is the capital of Kenya?"
GOLDS = {Q_MZ: ["Maputo"], Q_CR: ["San Jose"], Q_KE: ["Nairobi"]}


def row(question, text, calls=0, em=0.0):
    return {"question": question, "text": text, "calls": calls, "em": em}


def test_contradictions_are_wrong_direct_answers_whose_thought_states_a_gold_and_not_the_answer():
    rows = [
        row(Q_MZ, "<thought>The capital of Mozambique is Maputo.</thought><answer>Mozambique</answer>"),  # yes
        row(Q_CR, "<thought>The capital of Costa Rica is San José de Asunción.</thought>"
                  "<answer>San José de Asunción</answer>"),        # its thought states its own answer
        row(Q_KE, "<thought>The capital of Kenya is Mombasa.</thought><answer>Mombasa</answer>"),  # no gold stated
        row(Q_MZ, "<thought>The capital of Mozambique is Maputo.</thought><answer>Maputo</answer>", em=1.0),  # right
        row(Q_MZ, "<thought>I will search.</thought><call>Mozambique</call><obs>Maputo</obs><answer>Beira</answer>",
            calls=1),                                             # not direct
    ]
    assert contradictions(rows, GOLDS) == [(rows[0], "Maputo")]


def test_a_question_missing_from_the_question_file_is_named():
    with pytest.raises(ValueError, match="Capital of Peru"):
        contradictions([row("Capital of Peru?", "<answer>Lima</answer>")], GOLDS)


def test_answer_logprob_is_the_chain_rule_over_the_answer_tokens():
    model, tok = load_model_and_tokenizer("tiny")
    model.eval()
    context, answer = "<thought>A is B.</thought><answer>", "B"
    ids = tok.encode(context + answer + "</answer>", add_special_tokens=False)
    n = len(tok.encode(context, add_special_tokens=False))
    total = 0.0
    with torch.no_grad():
        for t in range(n, len(ids)):  # one forward per token: P(token t | tokens before it)
            logits = model(torch.tensor([ids[:t]])).logits[0, -1].float()
            total += float(logits.log_softmax(-1)[ids[t]])
    assert abs(answer_logprob(model, tok, context, answer) - total) < 1e-4
    assert len(ids) - n == 2  # "B" and "</answer>" (one token in the test tokenizer): a sum of two terms


def test_forced_recall_context_is_the_prompt_then_the_direct_traces_thought():
    _, tok = load_model_and_tokenizer("tiny")
    kenya = QAExample(id="capital/KE", question=Q_KE, answers=("Nairobi",), kind=MEMORY, type="capital", hops=("Kenya",))
    own = {"capital/KE": "Well. The capital of Kenya is Nairobi, a big city."}
    assert forced_recall_context(tok, kenya, own) == \
        build_prompt(tok, Q_KE) + "<thought>The capital of Kenya is Nairobi.</thought><answer>"
    assert forced_recall_context(tok, kenya, {}).endswith("<thought>The capital of Kenya is Nairobi.</thought><answer>")


def test_greedy_answers_are_greedy_continuations_cut_at_the_closing_tag():
    model, tok = load_model_and_tokenizer("tiny")
    model.eval()
    # the tiny model repeats the last token: three contexts, three different continuations, one of them
    # the closing tag at once (an empty answer)
    contexts = ["<thought>A is B.</thought><answer>", "Q: where? C", "<thought>C.</thought></answer>"]
    expected = []
    for context in contexts:  # one at a time, no padding: HF generate's greedy decoding
        ids = torch.tensor([tok.encode(context, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        expected.append(tok.decode(out[0, ids.shape[1]:]).replace(tok.eos_token, "").split("</answer>")[0])
    assert len(set(expected)) == 3 and expected[2] == ""
    assert greedy_answers(model, tok, contexts, max_new_tokens=6) == expected
    assert greedy_answers(model, tok, contexts, max_new_tokens=6, batch=1) == expected


def test_answer_slot_keeps_the_space_the_policy_wrote_after_the_tag():
    thought = "<thought>The capital of Greece is Athens.</thought>"
    assert answer_slot(thought + "<answer> Tokyo</answer>") == (thought + "<answer>", " ")
    assert answer_slot(thought + "<answer>Tokyo</answer>") == (thought + "<answer>", "")
    assert answer_slot("<answer>x</answer><answer>\n  Tokyo") == ("<answer>x</answer><answer>", "\n  ")  # the last
