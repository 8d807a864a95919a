"""Lines of code of the files `GRPOModule.training_step` needs, without docstrings, comments and blank lines.

    python dev/count_loc.py                  # the algorithm files (ALGORITHM below), one line each and the total
    python dev/count_loc.py grpo/sft.py ...  # any files

A line counts when it holds a token of code (a line with code and a comment counts once); the lines of
a docstring (a statement that is only a string: the first of a module, class or function, or the
attribute docstring under a dataclass field) do not.
"""
from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALGORITHM = ["grpo/module.py", "grpo/agent.py", "grpo/rollout.py", "grpo/kvcache.py", "grpo/logprobs.py",
             "grpo/losses.py", "grpo/rewards.py", "grpo/metrics.py"]
NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers covered by docstrings: every statement that is a bare string (the docstring of a
    module, class or function, and the attribute docstrings under dataclass fields)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def code_lines(source: str) -> int:
    """Lines holding at least one code token, outside docstrings."""
    skip = docstring_lines(ast.parse(source))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in NOT_CODE:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in skip)
    return len(lines)


def main(paths: list[str]) -> None:
    total = 0
    for path in paths:
        n = code_lines((REPO / path).read_text(encoding="utf-8"))
        total += n
        print(f"{n:6d}  {path}")
    print(f"{total:6d}  total")


if __name__ == "__main__":
    main(sys.argv[1:] or [p for p in ALGORITHM if (REPO / p).exists()])
