"""The prompt the policy sees, and the text of the tool protocol.

One system prompt for SFT traces, GRPO rollouts, evaluation and inference: the format a
model learns in the cold start must be exactly the one it is trained and judged on.
"""
from __future__ import annotations

SYSTEM_PROMPT = (
    "You answer questions. You may think briefly inside <thought></thought>. "
    "If you know the answer, give it directly inside <answer></answer>. "
    "If you need information, search with <call>search query</call>; the result comes back "
    "inside <obs></obs>. Every search has a cost: search only when you need to. "
    "End with <answer>short answer</answer>."
)

OBS_OPEN, OBS_CLOSE = "<obs>", "</obs>"
BUDGET_OBSERVATION = "Tool budget exhausted: answer now."


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
