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
