"""The tool protocol: the prompt the policy sees, the tags it writes, and how they are parsed.

One protocol for SFT traces, GRPO rollouts, evaluation and inference: the format a model learns
in the cold start must be exactly the one it is trained and judged on. Pure Python (no torch),
and a leaf: it imports nothing from the other packages of this project.

Completion format (observations are inserted by the environment, never by the model):

    <thought>...</thought>  <call>query</call><obs>...</obs>  ...  <answer>...</answer>
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# The prompt

SYSTEM_PROMPT = (
    "You answer questions. You may think briefly inside <thought></thought>. "
    "If you know the answer, give it directly inside <answer></answer>. "
    "If you need information, search with <call>search query</call>; the result comes back "
    "inside <obs></obs>. Every search has a cost: search only when you need to. "
    "End with <answer>short answer</answer>."
)


def chatml(system: str, user: str) -> str:
    """The ChatML prompt (SmolLM2's template) ending where the assistant starts writing."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def build_prompt(tokenizer, question: str, system: str = SYSTEM_PROMPT) -> str:
    """The prompt text: the tokenizer's own chat template when it has one, else plain ChatML."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return chatml(system, question)

# ---------------------------------------------------------------------------------------------
# Observations: what the environment appends after a `</call>`

OBS_OPEN, OBS_CLOSE = "<obs>", "</obs>"
BUDGET_OBSERVATION = "Tool budget exhausted: answer now."


def observation_text(result: str) -> str:
    """What the environment appends after a `</call>`: its result wrapped in <obs> tags."""
    return f"{OBS_OPEN}{result}{OBS_CLOSE}"


def budget_note(calls_left: int) -> str:
    """The Budget Tracker's line (Liu et al. 2025, "Budget-Aware Tool-Use Enables Effective Agent
    Scaling"): how many searches remain, appended inside an observation when `show_budget` is on."""
    return f" [{calls_left} search{'' if calls_left == 1 else 'es'} left]"


def encode_observation(tokenizer, result: str, max_obs_tokens: int, calls_left: int | None = None) -> list[int]:
    """The ids forced after a `</call>`: `<obs>` + result (cut to max_obs_tokens) [+ budget note] + `</obs>`.

    The one encoding of an observation, shared by SFT traces, training rollouts and inference, so a
    model is trained on exactly what it will be fed. Each piece is encoded on its own (the sampled
    ids before it are never re-tokenized); the budget note comes after the cut, so it is never lost.
    calls_left=None: no budget note.
    """
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    ids = encode(OBS_OPEN) + encode(result)[:max_obs_tokens]
    if calls_left is not None:
        ids += encode(budget_note(calls_left))
    return ids + encode(OBS_CLOSE)

# ---------------------------------------------------------------------------------------------
# Tags: any spaces and any case inside the brackets ("< / Answer >")

CALL_CLOSE = re.compile(r"<\s*/\s*call\s*>", re.IGNORECASE)
ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
CALL_QUERY = re.compile(r"<\s*call\s*>(.*?)<\s*/\s*call\s*>", re.IGNORECASE | re.DOTALL)
CALL_OPEN = re.compile(r"<\s*call\s*>", re.IGNORECASE)
OBS_BLOCK = re.compile(r"<\s*obs\s*>(.*?)<\s*/\s*obs\s*>", re.IGNORECASE | re.DOTALL)
THOUGHT_BLOCK = re.compile(r"<\s*thought\s*>(.*?)<\s*/\s*thought\s*>", re.IGNORECASE | re.DOTALL)
# One tag: "<", optional "/", a known name, ">" with any spaces and any case: "< / Answer >".
# Linear time: each backtracking step is O(1) and each "<" only scans the whitespace after it.
_TAG = re.compile(r"<\s*(/\s*)?(thought|call|obs|answer)\s*>", re.IGNORECASE)
END_OF_TEXT_MARKERS = ("<|im_end|>", "<|endoftext|>")


def _strip_end_markers(text: str) -> str:
    """Remove trailing whitespace and end-of-text markers (any number, any order), in O(len)."""
    end = len(text)
    while True:
        while end > 0 and text[end - 1].isspace():
            end -= 1
        for marker in END_OF_TEXT_MARKERS:
            if text.endswith(marker, 0, end):
                end -= len(marker)
                break
        else:
            return text[:end]

# ---------------------------------------------------------------------------------------------
# Tolerant parsing of a completion


@dataclass(frozen=True)
class Parsed:
    """What `parse_completion` recovers from one completion."""
    answer: str | None       # text of the last <answer> (stripped); None if absent or blank
    num_calls: int           # number of <call>...</call> pairs (closed calls)
    calls: tuple[str, ...]   # their queries, stripped, in order
    num_unclosed_calls: int  # <call> opened and never closed
    well_formed: bool        # see parse_completion
    reason: str              # "" when well-formed, else the first problem found


def _format_problem(text: str, tags: list[tuple[bool, str, int, int]]) -> str:
    """First violation of the flat grammar, or "" (the rules are listed in parse_completion)."""
    open_name, prev_closed, answer_end, num_answers = None, None, -1, 0
    for is_close, name, start, end in tags:
        if open_name is None:
            if is_close:
                return f"stray </{name}>"
            if prev_closed == "call" and name != "obs":
                return "<call> without <obs>"
            if name == "obs" and prev_closed != "call":
                return "<obs> not after </call>"
            if name == "answer" and num_answers:
                return "several <answer> blocks"
            open_name, open_end = name, end
        elif is_close and name == open_name:
            if name == "answer":
                num_answers, answer_end = num_answers + 1, end
                if not text[open_end:start].strip():
                    return "empty <answer>"
            prev_closed, open_name = name, None
        else:
            return f"<{'/' if is_close else ''}{name}> inside <{open_name}>"
        if not is_close:
            prev_closed = None
    if open_name is not None:
        return f"unclosed <{open_name}>"
    if prev_closed == "call":
        return "<call> without <obs>"
    if num_answers == 0:
        return "no <answer>"
    if text[answer_end:].strip():
        return "text after </answer>"
    return ""


def parse_completion(text: str) -> Parsed:
    """Parse a completion tolerantly; never raises, runs in linear time.

    Tags match with any spaces and case inside the brackets ("< Answer >", "</ call>").
    Trailing end-of-text markers (<|im_end|>, <|endoftext|>) and whitespace are removed first.

    Recovery: the answer is the text of the LAST <answer>, up to the next </answer>, or to the
    end of the text when it is never closed. Calls: a </call> closes the currently open <call>;
    a <call> opened while another is open, or open at the end, counts as unclosed.

    Well-formed means all of:
      1. blocks do not nest: between an opening tag and its closing tag there is no other tag
         (so no <call> inside <answer>, no <answer> inside <thought>);
      2. every opening tag is closed (this covers <thought>, <call>, <answer>, <obs>) and no
         closing tag appears without its opening tag;
      3. every </call> is followed by an <obs> block, and every <obs> follows a </call>;
      4. exactly one <answer>...</answer>, its text not blank, and nothing but whitespace after
         it. Free text between blocks is allowed.
    The rollout answers a call refused over the tool budget with a budget observation
    (`<obs>Tool budget exhausted: answer now.</obs>`), so a refused call leaves the completion
    well-formed; the rewards charge it through the rollout's `num_calls_no_obs` instead. A `<call>`
    never closed makes it malformed (rule 2). Observations must not contain tag-like text (the
    environment escapes it, `envs.sandbox.run_tool`), otherwise it is read as nesting.
    """
    text = _strip_end_markers(text)
    tags = [(m.group(1) is not None, m.group(2).lower(), m.start(), m.end()) for m in _TAG.finditer(text)]

    calls: list[str] = []
    num_unclosed, call_start = 0, None
    last_answer_open: tuple[int, int] | None = None  # (index in tags, end of the tag)
    for i, (is_close, name, start, end) in enumerate(tags):
        if name == "call":
            if not is_close:
                num_unclosed += call_start is not None
                call_start = end
            elif call_start is not None:
                calls.append(text[call_start:start].strip())
                call_start = None
        elif name == "answer" and not is_close:
            last_answer_open = (i, end)
    num_unclosed += call_start is not None

    answer = None
    if last_answer_open is not None:
        i, start = last_answer_open
        close = next((t for t in tags[i + 1:] if t[0] and t[1] == "answer"), None)
        answer = text[start:close[2] if close else len(text)].strip() or None

    reason = _format_problem(text, tags)
    return Parsed(answer, len(calls), tuple(calls), num_unclosed, not reason, reason)


def observations(text: str) -> list[str]:
    """The text of every closed <obs>...</obs> block of a completion, in order."""
    return OBS_BLOCK.findall(text)


def thoughts(text: str) -> list[str]:
    """The text of every closed <thought>...</thought> block of a completion, in order."""
    return THOUGHT_BLOCK.findall(text)
