"""The tool protocol (envs/protocol.py): the parser's tolerance, its malformed reasons, linear time.

The property test (never raises, consistent on any text) is in tests/test_rewards.py, beside the
rewards' own, on the same generated texts.
"""
import time

import pytest

from envs.protocol import observations, parse_completion
from tests.fakes import KENYA

# --------------------------------------------------------------------------------------- parser


def test_parse_reference_example():
    p = parse_completion(KENYA)
    assert (p.answer, p.num_calls, p.calls, p.num_unclosed_calls) == ("53 million", 1, ("Kenya",), 0)
    assert p.well_formed and p.reason == ""


def test_parse_spaces_and_case_in_tags():
    p = parse_completion("< call > Kenya </ CALL ><obs>o</Obs >< answer > Paris </ Answer >")
    assert (p.answer, p.calls, p.well_formed) == ("Paris", ("Kenya",), True)


def test_parse_unclosed_final_answer_is_recovered_but_malformed():
    p = parse_completion("<call>x</call><obs>o</obs><answer> Paris <|im_end|>")
    assert p.answer == "Paris" and not p.well_formed and "unclosed <answer>" in p.reason


def test_parse_duplicate_answers_takes_last():
    p = parse_completion("<answer>Lyon</answer><answer>Paris</answer>")
    assert p.answer == "Paris" and not p.well_formed and "several" in p.reason


def test_parse_nested_tags():
    p = parse_completion("<answer><call>x</call>Paris</answer>")
    assert p.num_calls == 1 and not p.well_formed and "<call> inside <answer>" in p.reason
    p = parse_completion("<thought><answer>Paris</answer></thought>")
    assert p.answer == "Paris" and not p.well_formed


def test_parse_end_of_text_tokens_after_answer():
    assert parse_completion("<answer>Paris</answer><|im_end|>").well_formed
    assert parse_completion("<answer>Paris</answer> <|im_end|><|endoftext|>\n").well_formed
    assert parse_completion("<answer>Paris</answer> and more").reason == "text after </answer>"


def test_parse_unclosed_calls_counted():
    # first <call> is abandoned when the second opens; only "b" is a closed pair
    p = parse_completion("<call>a<call>b</call><obs>o</obs><answer>x</answer>")
    assert (p.num_calls, p.calls, p.num_unclosed_calls, p.well_formed) == (1, ("b",), 1, False)
    assert parse_completion("<call>Kenya").num_unclosed_calls == 1


@pytest.mark.parametrize("text, reason", [
    ("Paris", "no <answer>"),
    ("<answer>  </answer>", "empty <answer>"),
    ("</call><answer>x</answer>", "stray </call>"),
    ("<call>q</call><answer>x</answer>", "<call> without <obs>"),
    ("<obs>made up</obs><answer>x</answer>", "<obs> not after </call>"),
    ("<thought>hm<answer>x</answer>", "<answer> inside <thought>"),
])
def test_parse_malformed_reasons(text, reason):
    p = parse_completion(text)
    assert not p.well_formed and p.reason == reason


def test_parse_blank_answer_is_none():
    assert parse_completion("<answer>   </answer>").answer is None
    assert parse_completion("no tags").answer is None


@pytest.mark.parametrize("text", [
    "<" + " " * 1_000_000, "<call>" * 200_000, "< answer" + " " * 1_000_000,
    "<|im_end|>" * 100_000, "<answer>" * 100_000 + "x", "< / answer " * 100_000,
])
def test_parse_megabyte_inputs_linear_time(text):
    t0 = time.perf_counter()
    parse_completion(text)
    assert time.perf_counter() - t0 < 3.0  # quadratic behaviour would take minutes


def test_observations_are_the_closed_obs_blocks_in_order():
    text = "<call>a</call><obs>first</obs><call>b</call>< OBS >sec\nond</ obs ><call>c</call><obs>never closed"
    assert observations(text) == ["first", "sec\nond"]
    assert observations("<answer>x</answer>") == []
