"""Training curves as a PNG, from a run's TensorBoard event files (for `results/`, where no
TensorBoard runs): one panel per tag, the raw values and their running mean.

    python -m callbacks.curves runs/grpo_economy/version_0 --out results/economy/curves.png \\
        --tags reward/mean tools/memory/search_rate tools/lookup/search_rate eval/memory/search_rate
"""
from __future__ import annotations

import argparse
import glob
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data.files import atomic_write

DEFAULT_TAGS = ("reward/mean", "tools/memory/search_rate", "tools/lookup/search_rate", "reward/correct",
                "eval/em", "eval/memory/search_rate")


def read_scalars(logdir: str | Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} over every event file of `logdir`, sorted by step (a step logged
    twice, e.g. after a resume, keeps its last value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(str(Path(logdir) / "events.out.tfevents.*")))
    if not files:
        raise FileNotFoundError(f"{logdir}: no TensorBoard event file")
    out: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    for f in files:
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in tags:
            if tag in acc.Tags()["scalars"]:
                out[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in out.items()}


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """mean of values[max(0, i - window + 1) .. i] at every i."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def curves_figure(scalars: dict[str, list[tuple[int, float]]], window: int = 5, title: str = "") -> Figure:
    tags = [t for t, pts in scalars.items() if pts]
    fig = Figure(figsize=(4 * min(len(tags), 3), 3 * ((len(tags) + 2) // 3)), dpi=100)
    FigureCanvasAgg(fig)
    for i, tag in enumerate(tags):
        ax = fig.add_subplot((len(tags) + 2) // 3, min(len(tags), 3), i + 1)
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, color="tab:blue", alpha=0.35, marker="." if len(steps) < 10 else None)
        if len(steps) >= window:
            ax.plot(steps, running_mean(values, window), color="tab:blue", label=f"mean of {window}")
            ax.legend(fontsize=7)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logdir", help="a run's log folder (holding events.out.tfevents.*)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS))
    ap.add_argument("--window", type=int, default=5, help="running-mean window (steps)")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    if args.window < 1:
        ap.error(f"--window must be >= 1, got {args.window}")
    try:
        scalars = read_scalars(args.logdir, args.tags)
    except FileNotFoundError as err:
        ap.error(str(err))
    if missing := [t for t, pts in scalars.items() if not pts]:
        print(f"not logged in {args.logdir}: {', '.join(missing)}")
    if len(missing) == len(scalars):
        ap.error("none of the tags was logged")
    fig = curves_figure(scalars, args.window, args.title)
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, format="png"))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
