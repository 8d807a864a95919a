"""envs/sandbox.py: a tool call that raises, hangs or floods becomes a short observation."""
from __future__ import annotations

import subprocess
import sys
import time

from envs.sandbox import OVERSIZED_CHARS, run_tool
from tests.fakes import ENV_TEXT
from tests.run_helpers import REPO


def test_run_tool_turns_each_failure_into_a_short_observation(faulty_env):
    assert run_tool(faulty_env, "ok") == (ENV_TEXT, False)
    assert run_tool(faulty_env, "boom") == ("Tool error: ConnectionError", True)
    t0 = time.perf_counter()
    assert run_tool(faulty_env, "hang", timeout=0.2) == ("Tool error: timeout", True)
    assert time.perf_counter() - t0 < 2.0
    text, failed = run_tool(faulty_env, "huge", max_chars=400)
    assert (text, failed) == ("x" * 400, True)
    assert run_tool(lambda q: "y" * (OVERSIZED_CHARS - 1), "q", max_chars=10) == ("y" * 10, False)  # only cut
    assert run_tool(lambda q: "<answer>a</answer>", "q", timeout=None) == ("‹answer>a‹/answer>", False)


def test_a_hung_tool_call_does_not_keep_the_process_alive():
    """The abandoned call's thread is a daemon: the interpreter exits at once (a ThreadPoolExecutor
    worker would be joined at exit, i.e. never)."""
    code = ("import time; from envs.sandbox import run_tool; "
            "print(run_tool(lambda q: time.sleep(3600), 'q', timeout=0.1))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.strip() == "('Tool error: timeout', True)", out.stderr[-2000:]
    assert time.perf_counter() - t0 < 60
