"""Running a tool call so that no tool can break a batch: timeout, size cap, defused tags.

`run_tool(env, query)` is the one way a query reaches a tool, for GRPO rollouts, inference and
the SFT traces alike (`data.traces` builds its observations with it, so a trace holds exactly
what a rollout would have been fed). A failure becomes a short observation for its own sample;
the other samples of the batch go on.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

TOOL_TIMEOUT_S = 10.0  # a tool call still running after this many seconds is abandoned (see run_tool)
OVERSIZED_CHARS = 100_000  # a longer output is a malfunction (a search hit is a few hundred characters)


def _call_with_timeout(env, query: str, timeout: float):
    """`env(query)` in a worker thread; raises concurrent.futures.TimeoutError after `timeout` seconds.

    A Python thread cannot be killed: a call that hangs keeps its thread, and whatever the env
    holds, until it returns by itself; its result is then dropped. The thread is a daemon so that
    a hung call never keeps the process alive at exit (a ThreadPoolExecutor's workers are joined
    at interpreter exit, so one hung call would block the end of training).
    """
    future: Future = Future()

    def work():
        try:
            future.set_result(env(query))
        except BaseException as e:  # handed to the caller, which decides what is fatal
            future.set_exception(e)

    threading.Thread(target=work, name="tool-call", daemon=True).start()
    return future.result(timeout=timeout)


def run_tool(env, query: str, timeout: float | None = TOOL_TIMEOUT_S,
             max_chars: int | None = None) -> tuple[str, bool]:
    """The observation text for one call, and whether the tool failed (counted in `tool_errors`).

    A failing tool must not kill the other samples of the batch, so each failure becomes a short
    observation for its own sample only:
        raised     "Tool error: <exception type>"
        hung       "Tool error: timeout" after `timeout` seconds (None: no thread, wait for ever)
        oversized  longer than OVERSIZED_CHARS: failed, and cut like any output (below)
    Any output is cut to `max_chars` characters first, so that megabytes are never tokenized, and
    tag-like text is defused ("<" -> "‹") since it would corrupt the completion's format.
    """
    try:
        result = env(query) if timeout is None else _call_with_timeout(env, query, timeout)
    except FutureTimeout:  # (also a TimeoutError raised by the env itself)
        return "Tool error: timeout", True
    except Exception as e:
        return f"Tool error: {type(e).__name__}", True
    text = str(result)
    failed = len(text) > OVERSIZED_CHARS
    return text[:max_chars].replace("<", "‹"), failed
