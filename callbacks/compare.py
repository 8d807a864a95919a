"""Several policies evaluated on the same questions, side by side: the table and the Pareto plot.

Each input is the `eval.json` a `validate`/`test` run writes (`callbacks.report.EvalReport`), given
a label. The output folder gets

    table.md    one row per policy: EM, F1, calls / q, search rate, per kind (memory, lookup) EM and
                search rate, tokens / q, well-formed, the errors' classes (wrong direct: wrong without a
                search; misread: wrong though an observation held the gold — `grpo.evaluation`); with
                `--baseline LABEL` also EM - baseline EM
                and the call reduction 1 - calls / baseline calls (the issue's targets), with the
                paired standard error of the EM gap over the questions both answered (`paired_gap`)
    table.json  the same numbers, and where each came from
    pareto.png  EM against tool calls per question, one labelled point per policy, the Pareto
                frontier (max EM, min calls) as a line

    python -m callbacks.compare --out results/economy --baseline always-search \\
        always-search=runs/a/report/eval.json grpo=runs/b/report/eval.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from callbacks.report import fmt_num, pareto_frontier, pareto_plot
from data.files import atomic_write

# (title, key in eval.json's metrics, format)
COLUMNS = (("EM", "eval/em", ".3f"), ("F1", "eval/f1", ".3f"), ("calls / q", "eval/calls_per_sample", ".2f"),
           ("search rate", "eval/search_rate", ".2f"), ("memory EM", "eval/memory/em", ".3f"),
           ("memory search", "eval/memory/search_rate", ".2f"), ("lookup EM", "eval/lookup/em", ".3f"),
           ("lookup search", "eval/lookup/search_rate", ".2f"), ("tokens / q", "eval/tokens_per_sample", ".1f"),
           ("well-formed", "eval/well_formed", ".3f"), ("wrong direct", "eval/wrong_direct_rate", ".3f"),
           ("misread", "eval/misread_rate", ".3f"))


def read_eval(path: str | Path) -> dict:
    """The metrics and question counts of one eval.json; a clear error for anything else."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable eval.json ({err})") from err
    if not isinstance(record, dict) or "eval/em" not in record.get("metrics", {}):
        raise ValueError(f"{path}: no 'metrics' with 'eval/em' (is it the eval.json of a validate run?)")
    return {"metrics": record["metrics"], "num_questions": record.get("num_questions", {}), "source": str(path),
            "rows": record.get("rows", [])}


def paired_gap(rows: Sequence[dict], base_rows: Sequence[dict]) -> tuple[float, float, int] | None:
    """(mean, standard error, n) of d_i = em_i - em_base_i over the questions (by id) in both.

    The gap's resolution on a small question set: with d̄ the mean and s the sample standard
    deviation of the n differences, s.e. = s / √n (None with fewer than 2 shared questions). On 38
    questions one question is 2.6 EM points, and a gap within ±2 s.e. of 0 is not resolved.
    """
    base = {r["id"]: r["em"] for r in base_rows}
    d = [r["em"] - base[r["id"]] for r in rows if r["id"] in base]
    n = len(d)
    if n < 2:
        return None
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, (var / n) ** 0.5, n


def compare_rows(evals: dict[str, dict], baseline: str | None = None) -> list[dict]:
    """One row per label: the COLUMNS' values (None when absent) and, against `baseline`,
    em_gap = EM - baseline EM, its paired standard error em_gap_se (None without per-question rows)
    and call_reduction = 1 - calls / baseline calls (None if 0 calls)."""
    if baseline is not None and baseline not in evals:
        raise ValueError(f"--baseline {baseline!r}: not one of the labels {sorted(evals)}")
    base = evals[baseline]["metrics"] if baseline else None
    rows = []
    for label, ev in evals.items():
        m = ev["metrics"]
        row = {"label": label, "n": ev["num_questions"].get("all"), "source": ev["source"]}
        row |= {key: m.get(key) for _, key, _ in COLUMNS}
        if base is not None:
            row["em_gap"] = m["eval/em"] - base["eval/em"]
            paired = paired_gap(ev["rows"], evals[baseline]["rows"])
            row["em_gap_se"] = paired[1] if paired else None
            calls = base.get("eval/calls_per_sample")
            row["call_reduction"] = 1 - m["eval/calls_per_sample"] / calls if calls else None
        rows.append(row)
    return rows


def compare_markdown(rows: Sequence[dict], baseline: str | None = None) -> str:
    titles = [t for t, _, _ in COLUMNS] + (["EM - baseline", "call reduction"] if baseline else [])
    lines = ["| policy | n | " + " | ".join(titles) + " |", "|" + "---|" * (len(titles) + 2)]
    for r in rows:
        cells = [fmt_num(r[key], fmt) for _, key, fmt in COLUMNS]
        if baseline:
            se = "" if r["em_gap_se"] is None else f" ± {r['em_gap_se']:.3f}"
            cells += [fmt_num(r["em_gap"], "+.3f") + se, fmt_num(r["call_reduction"], ".0%")]
        lines.append(f"| {r['label']} | {r['n']} | " + " | ".join(cells) + " |")
    note = (f"\nBaseline of the last two columns: {baseline}; ± the paired standard error of the EM gap "
            f"over the same questions.\n" if baseline else "")
    return "\n".join(lines) + "\n" + note


def compare_figure(rows: Sequence[dict]) -> Figure:
    """EM against calls per question, labelled points, the (max EM, min calls) frontier."""
    xs, ys = [r["eval/calls_per_sample"] for r in rows], [r["eval/em"] for r in rows]
    return pareto_plot(xs, ys, [r["label"] for r in rows], pareto_frontier(list(zip(xs, ys))),
                       "tool calls per question", "accuracy vs tool calls, same questions")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evals", nargs="+", metavar="LABEL=EVAL_JSON", help="a label and the eval.json of a validate run")
    ap.add_argument("--out", type=Path, required=True, help="folder of table.md, table.json, pareto.png")
    ap.add_argument("--baseline", default=None, help="the label of the always-search policy")
    args = ap.parse_args(argv)
    evals = {}
    for item in args.evals:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            ap.error(f"{item!r}: expected LABEL=path/to/eval.json")
        if label in evals:
            ap.error(f"label {label!r} given twice")
        try:
            evals[label] = read_eval(path)
        except ValueError as err:
            ap.error(str(err))
    try:
        rows = compare_rows(evals, args.baseline)
    except ValueError as err:
        ap.error(str(err))
    text, fig = compare_markdown(rows, args.baseline), compare_figure(rows)
    atomic_write(args.out / "table.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    payload = json.dumps({"baseline": args.baseline, "rows": rows}, indent=1) + "\n"
    atomic_write(args.out / "table.json", lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))
    atomic_write(args.out / "pareto.png", lambda tmp: fig.savefig(tmp, format="png"))
    print(text + f"written: {args.out}/table.md, table.json, pareto.png")


if __name__ == "__main__":
    main()
