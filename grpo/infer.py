"""Answer questions with a trained policy: `python -m grpo.infer`.

    python -m grpo.infer --checkpoint runs/x/adapter --query "What is the population of Kenya?"
    python -m grpo.infer --checkpoint last.ckpt --file questions.jsonl --out answers.jsonl

One sequence at a time, through the very rollout loop of training (`grpo.rollout.rollout` with
G = 1: KV cache, stop at `</answer>` or EOS; after `</call>` the env runs and `<obs>result</obs>`,
encoded on its own, is fed to the model; past `max_tool_calls` the env answers with the budget
notice). On top of that, safety checks that training does not need, because a user waits on
the answer and nobody reads the reward; they are the rollout's `stop_checks` (`SafetyChecks`):

    context   stop when prompt + completion reach `context_fraction` of the model's window
    stuck     stop when fewer than `stuck_min_unique` of the last `stuck_window` sampled
              tokens are distinct (a loop like "the the the ...")
    budget    stop after `max_step_tokens` sampled tokens without a tool call, or
              `max_new_tokens` in total
    recovery  an `<answer>` never closed still gives its text as the answer
              (`parse_completion`); a `<call>` still open at the end is not run (`unclosed_call`)

Greedy by default (`--temperature 0`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from envs.protocol import CALL_QUERY, OBS_CLOSE, OBS_OPEN, build_prompt, parse_completion
from grpo.rollout import RowState, rollout
from models.loading import SMOLLM2, add_lora, load_model_and_tokenizer

STOP_REASONS = ("answer", "eos", "budget", "context", "stuck")


@dataclass
class Limits:
    """Generation limits of `answer`; each field is also a CLI flag (`max_new_tokens` -> `--max-new-tokens`)."""
    max_new_tokens: int = field(default=512, metadata={"help": "total budget of sampled tokens (observations not counted)"})
    max_step_tokens: int = field(default=128, metadata={"help": "sampled tokens allowed between two tool calls"})
    max_tool_calls: int = field(default=5, metadata={"help": "executed calls; past it the env answers with the budget notice"})
    max_obs_tokens: int = field(default=160, metadata={"help": "an observation is cut to this many tokens (as in training)"})
    context_fraction: float = field(default=0.8, metadata={"help": "stop when the context reaches this share of the model's window"})
    stuck_window: int = field(default=50, metadata={"help": "recent sampled tokens the stuck check looks at"})
    stuck_min_unique: float = field(default=0.3, metadata={"help": "stuck when fewer than this share of the window is distinct"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature; 0 is greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold (temperature > 0 only)"})
    show_budget: bool = field(default=False, metadata={"help": "end each observation with the searches left, "
                                                               "as in training with model.show_budget"})

    def __post_init__(self):
        def bad(name, rule):
            return ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be {rule}")
        for name in ("max_new_tokens", "max_step_tokens", "max_obs_tokens", "stuck_window"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        for name in ("max_tool_calls", "temperature"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        for name in ("context_fraction", "stuck_min_unique", "top_p"):
            if not 0 < getattr(self, name) <= 1:
                raise bad(name, "in (0, 1]")


@dataclass
class InferenceResult:
    """One answered question."""
    answer: str | None    # text of the last <answer>, closed or not; None if there is none
    text: str             # the completion: sampled text with the <obs>...</obs> the env inserted
    calls: int            # tool calls the env executed
    queries: list[str]    # their queries
    tokens: int           # tokens sampled by the model (observations not counted)
    stop_reason: str      # one of STOP_REASONS
    unclosed_call: bool   # a `<call>` was still open at the end (it was not run)
    context_tokens: int   # prompt + completion tokens at the end


# --------------------------------------------------------------------------- the loop

class SafetyChecks:
    """The stop checks `answer` hands to the rollout (`rollout(stop_checks=...)`), in this order:

        context   prompt + completion reach `max_context` tokens
        stuck     fewer than stuck_min_unique x stuck_window distinct ids among the last
                  stuck_window sampled tokens
        budget    max_step_tokens sampled since the last tool call (the total, max_new_tokens, is
                  the rollout's own budget, checked after these)
    """

    def __init__(self, lim: Limits, max_context: int | None):
        self.lim, self.max_context = lim, max_context
        self.recent: deque[int] = deque(maxlen=lim.stuck_window)  # the last sampled ids (one row: G = 1)

    def context(self, row: RowState) -> str | None:
        full = self.max_context is not None and row.prompt_len + len(row.ids) >= self.max_context
        return "context" if full else None

    def stuck(self, row: RowState) -> str | None:
        self.recent.append(row.last_sampled)
        window, lim = self.recent, self.lim
        return "stuck" if len(window) == lim.stuck_window and len(set(window)) < lim.stuck_min_unique * lim.stuck_window \
            else None

    def step_budget(self, row: RowState) -> str | None:
        return "budget" if len(row.segment) >= self.lim.max_step_tokens else None

    def __iter__(self):
        return iter((self.context, self.stuck, self.step_budget))


@torch.no_grad()
def answer(model, tokenizer, env, question: str, generator: torch.Generator | None = None,
           **limits) -> InferenceResult:
    """Answer one question, running tool calls as they close; `limits` are the fields of `Limits`.

    This is `grpo.rollout.rollout` with one prompt and G = 1 (the same decode loop, KV cache and
    tool turns as training), with `SafetyChecks` as its stop checks. Put the model in eval mode.
    """
    lim = Limits(**limits)
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    max_context = int(lim.context_fraction * window) if window else None
    prompt = build_prompt(tokenizer, question)
    prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
    if max_context is not None and prompt_len >= max_context:  # not even run
        return InferenceResult(answer=None, text="", calls=0, queries=[], tokens=0, stop_reason="context",
                               unclosed_call=False, context_tokens=prompt_len)
    ro = rollout(model, tokenizer, [prompt], env, group_size=1, max_new_tokens=lim.max_new_tokens,
                 temperature=lim.temperature, top_p=lim.top_p, max_tool_calls=lim.max_tool_calls,
                 max_obs_tokens=lim.max_obs_tokens, generator=generator, show_budget=lim.show_budget,
                 stop_checks=list(SafetyChecks(lim, max_context)))
    text = ro.texts[0]
    return InferenceResult(
        answer=parse_completion(text).answer, text=text, calls=int(ro.num_calls[0]), queries=ro.queries[0],
        tokens=int(ro.num_generated[0]), stop_reason=ro.stop_reasons[0], unclosed_call=bool(ro.incomplete_calls[0]),
        context_tokens=int(ro.attention_mask[0].sum()))


# --------------------------------------------------------------------------- display

_OBS = re.compile(re.escape(OBS_OPEN) + r"(.*?)" + re.escape(OBS_CLOSE), re.DOTALL)
_ANSWER_TO_END = re.compile(r"<\s*answer\s*>.*", re.IGNORECASE | re.DOTALL)


def _short(s: str, width: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= width else s[:width - 1] + "…"


def transcript(question: str, r: InferenceResult, width: int = 160) -> str:
    """Readable transcript: Q, the model's text, → search("query"), ← observation (cut), A, stop line."""
    lines = [f"Q: {question}"]
    parts = _OBS.split(r.text)                   # [text, obs, text, obs, ..., text]
    for i in range(0, len(parts), 2):
        seg, obs = parts[i], parts[i + 1] if i + 1 < len(parts) else None
        call = CALL_QUERY.search(seg)
        thought = _ANSWER_TO_END.sub("", CALL_QUERY.sub("", seg))
        for marker in ("<|im_end|>", "<|endoftext|>"):
            thought = thought.replace(marker, "")
        if thought.strip():
            lines.append(f"   {_short(thought, 4 * width)}")
        if call:
            lines.append(f'   → search("{call.group(1).strip()}")')
        if obs is not None:
            lines.append(f"   ← {_short(obs, width)}")
    lines.append(f"A: {r.answer if r.answer is not None else '(no answer)'}")
    lines.append(f"[stop: {r.stop_reason}  tokens: {r.tokens}  calls: {r.calls}"
                 + ("  unclosed <call> not run" if r.unclosed_call else "") + "]")
    return "\n".join(lines)


# --------------------------------------------------------------------------- loading

def _load_lightning_checkpoint(path: Path, model_name: str | None):
    """Rebuild a module's policy from its hyper-parameters, then load the trainable weights it saved."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file: hparams hold dataclasses
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"--checkpoint {str(path)!r}: not a Lightning checkpoint (no hyper_parameters/state_dict)")
    hp = ckpt["hyper_parameters"]
    name = hp.get("model_name", SMOLLM2)
    if model_name is not None and model_name != name:
        raise ValueError(f"--model {model_name!r}: the checkpoint was trained on {name!r}")
    model, tokenizer = load_model_and_tokenizer(name, hp.get("dtype", "float32"), hp.get("load_in_4bit", False),
                                                seed=hp.get("seed", 0), init_adapter=hp.get("init_adapter"))
    if hp.get("lora", True):
        model = add_lora(model, hp["lora_r"], hp["lora_alpha"], 0.0, tuple(hp["lora_targets"]))
    state = ckpt["state_dict"]
    foreign = [k for k in state if not k.startswith("policy.")]
    weights = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if foreign or unexpected or not weights:
        raise ValueError(f"--checkpoint {str(path)!r}: keys the policy does not have: "
                         f"{(foreign + ['policy.' + k for k in unexpected])[:5] or '(no policy.* weights)'}")
    return model, tokenizer


def load_for_inference(checkpoint: str | None, model_name: str | None = None):
    """(model in eval mode, tokenizer) from a PEFT adapter folder, a Lightning `.ckpt`, or None/"none".

    An adapter is applied to `model_name` (default SmolLM2-135M-Instruct); a `.ckpt` names its
    own model (a different `model_name` is an error). LoRA adapters are merged into the weights
    (`merge_and_unload`): nothing is trained here, and decoding then runs one matmul per adapted
    Linear instead of three (training rollouts do the same, reversibly: `models.lora.merged_lora`).
    """
    if checkpoint is None or str(checkpoint).lower() in ("", "none"):
        model, tokenizer = load_model_and_tokenizer(model_name or SMOLLM2)
        return model.eval(), tokenizer
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"--checkpoint {checkpoint!r}: a folder without adapter_config.json (not a PEFT adapter)")
        from peft import PeftModel

        model, tokenizer = load_model_and_tokenizer(model_name or SMOLLM2)
        return PeftModel.from_pretrained(model, path).merge_and_unload().eval(), tokenizer
    if path.is_file():
        model, tokenizer = _load_lightning_checkpoint(path, model_name)
        return (model.merge_and_unload() if hasattr(model, "merge_and_unload") else model).eval(), tokenizer
    raise FileNotFoundError(f"--checkpoint {checkpoint!r}: no such file or folder")


def read_questions(path: str | Path) -> list[str]:
    """Questions from a .txt file (one per non-blank line) or a .jsonl file (a "question" field per line)."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--file {str(path)!r}: expected a .txt or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"--file {str(path)!r}: no such file")
    questions = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            questions.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        q = record.get("question") if isinstance(record, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{path}:{n}: expected an object with a non-empty string field \"question\"")
        questions.append(q.strip())
    if not questions:
        raise ValueError(f"--file {str(path)!r}: holds no question")
    return questions


def build_env(task: str, data: str | None):
    """The search tool over the task's documents (QADataModule.search_env)."""
    from data.datamodule import QADataModule

    if task == "hotpotqa" and data is None:
        raise ValueError("--task hotpotqa needs --data PATH (a HotpotQA .json/.jsonl file)")
    if task == "offline" and data is not None:
        raise ValueError("--data is only read with --task hotpotqa (the offline task has no data file)")
    return QADataModule(task=task, train_path=data).search_env()


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m grpo.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="PEFT adapter folder, Lightning .ckpt, or none (the base model)")
    p.add_argument("--model", default=None, help=f"base model for an adapter or none (default {SMOLLM2}; 'tiny' for tests)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--query", help="one question")
    src.add_argument("--file", help="questions: .txt (one per line) or .jsonl (a 'question' field per line)")
    p.add_argument("--out", help="JSONL rows go here (batch mode default: stdout, without transcripts)")
    p.add_argument("--task", default="offline", choices=("offline", "hotpotqa"), help="whose documents the search tool indexes")
    p.add_argument("--data", default=None, help="HotpotQA file whose paragraphs are indexed (--task hotpotqa)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--obs-chars", type=int, default=160, help="observations are cut to this many characters on screen")
    for f in fields(Limits):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, help=f.metadata["help"])
    args = p.parse_args(argv)
    limits = {f.name: getattr(args, f.name) for f in fields(Limits)}
    try:  # every input is checked before the model loads
        Limits(**limits)
        questions = [args.query] if args.query is not None else read_questions(args.file)
        env = build_env(args.task, args.data)
        model, tokenizer = load_for_inference(args.checkpoint, args.model)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if torch.cuda.is_available():
        model = model.cuda()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(args.seed)

    rows_only = args.file is not None and not args.out  # batch rows on stdout: no transcripts there
    with open(args.out, "w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout) as sink:
        for q in questions:
            r = answer(model, tokenizer, env, q, generator=generator, **limits)
            if not rows_only:
                print(transcript(q, r, args.obs_chars) + "\n", flush=True)
            if args.out or args.file is not None:
                row = {"question": q, "answer": r.answer, "calls": r.calls, "queries": r.queries, "tokens": r.tokens,
                       "stop_reason": r.stop_reason, "transcript": r.text}
                print(json.dumps(row, ensure_ascii=False), file=sink, flush=True)

if __name__ == "__main__":
    main()
