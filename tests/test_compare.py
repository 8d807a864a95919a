"""Tests of the side-by-side comparison of evaluated policies (callbacks/compare.py)."""
from __future__ import annotations

import json

import pytest

from callbacks.compare import compare_markdown, compare_rows, main, paired_gap, read_eval


def write_eval(path, em, calls, memory_search=None, rows=()):
    metrics = {"eval/em": em, "eval/f1": em, "eval/calls_per_sample": calls, "eval/search_rate": min(calls, 1.0),
               "eval/tokens_per_sample": 40.0 + 30 * calls, "eval/well_formed": 1.0}
    if memory_search is not None:
        metrics["eval/memory/search_rate"] = memory_search
    path.write_text(json.dumps({"metrics": metrics, "num_questions": {"all": 38}, "rows": list(rows)}))
    return path


def test_rows_against_the_always_search_baseline(tmp_path):
    evals = {"always": read_eval(write_eval(tmp_path / "a.json", 0.90, 1.25, 1.0)),
             "grpo": read_eval(write_eval(tmp_path / "b.json", 0.88, 0.50, 0.1))}
    always, grpo = compare_rows(evals, baseline="always")
    assert always["em_gap"] == 0.0 and always["call_reduction"] == 0.0
    assert grpo["em_gap"] == pytest.approx(-0.02) and grpo["call_reduction"] == pytest.approx(0.6)  # 1 - 0.5/1.25
    assert grpo["eval/memory/search_rate"] == 0.1 and grpo["eval/lookup/em"] is None and grpo["n"] == 38
    md = compare_markdown([always, grpo], "always")
    assert "| grpo | 38 | 0.880 | 0.880 | 0.50 | 0.50 | n/a | 0.10 | n/a | n/a | 55.0 | 1.000 | n/a | n/a | -0.020 | 60% |" in md
    assert "call reduction" not in compare_markdown(compare_rows(evals), None)
    with pytest.raises(ValueError, match="'nope'"):
        compare_rows(evals, baseline="nope")


def test_paired_gap_by_hand(tmp_path):
    """Differences over the shared ids only: q1 0-1 = -1, q2 1-1 = 0, q3 1-0 = +1, q4 0-1 = -1 (q5 has no pair):
    mean -0.25, sample variance ((-0.75)² + 0.25² + 1.25² + (-0.75)²) / 3 = 2.75 / 3, s.e. = √(2.75/3/4)."""
    mine = [{"id": f"q{i}", "em": em} for i, em in enumerate([0.0, 1.0, 1.0, 0.0, 1.0], 1)]
    base = [{"id": f"q{i}", "em": em} for i, em in enumerate([1.0, 1.0, 0.0, 1.0], 1)]
    shuffled = [base[2], base[0], base[3], base[1]]             # by position the differences would be 0, 0, 0, -1
    mean, se, n = paired_gap(mine, shuffled)                    # matched by id, not by position
    assert (mean, n) == (-0.25, 4) and se == pytest.approx((2.75 / 3 / 4) ** 0.5)
    assert paired_gap(mine[:1], base) is None
    a = write_eval(tmp_path / "a.json", 0.75, 1.0, rows=base)
    b = write_eval(tmp_path / "b.json", 0.60, 0.4, rows=mine)
    rows = compare_rows({"always": read_eval(a), "grpo": read_eval(b)}, baseline="always")
    assert rows[0]["em_gap_se"] == 0.0 and rows[1]["em_gap_se"] == pytest.approx(se)
    assert f"| -0.150 ± {se:.3f} | 60% |" in compare_markdown(rows, "always")


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="x.json.*eval/em"):
        read_eval(tmp_path / "x.json")
    with pytest.raises(ValueError, match="missing.json"):
        read_eval(tmp_path / "missing.json")


def test_command_line_writes_the_table_and_the_plot(tmp_path, capsys):
    a, b = write_eval(tmp_path / "a.json", 0.9, 1.0), write_eval(tmp_path / "b.json", 0.8, 0.4)
    main([f"always={a}", f"grpo={b}", "--out", str(tmp_path / "out"), "--baseline", "always"])
    assert "| grpo |" in capsys.readouterr().out
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [r["label"] for r in table["rows"]] == ["always", "grpo"] and table["baseline"] == "always"
    assert (tmp_path / "out" / "pareto.png").read_bytes().startswith(b"\x89PNG")
    for bad in ([f"{a}"], [f"x={a}", f"x={b}"]):
        with pytest.raises(SystemExit):
            main(bad + ["--out", str(tmp_path / "o2")])
