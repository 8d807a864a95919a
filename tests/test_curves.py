"""Training curves from TensorBoard event files (callbacks/curves.py)."""
from __future__ import annotations

import pytest
from torch.utils.tensorboard import SummaryWriter

from callbacks.curves import main, read_scalars, running_mean


def test_running_mean_by_hand():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0], 5) == [2.0, 3.0]


def test_scalars_read_back_sorted_and_plotted(tmp_path):
    with SummaryWriter(tmp_path) as w:
        for step, v in [(2, 0.5), (0, 0.1), (1, 0.3)]:
            w.add_scalar("reward/mean", v, step)
        w.add_scalar("tools/memory/search_rate", 1.0, 0)
    scalars = read_scalars(tmp_path, ["reward/mean", "tools/memory/search_rate", "eval/em"])
    assert [s for s, _ in scalars["reward/mean"]] == [0, 1, 2]
    assert [round(v, 6) for _, v in scalars["reward/mean"]] == [0.1, 0.3, 0.5]
    assert scalars["eval/em"] == []
    main([str(tmp_path), "--out", str(tmp_path / "c.png"), "--tags", "reward/mean", "eval/em", "--window", "2"])
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "d.png")])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--out", str(tmp_path / "d.png"), "--tags", "eval/em"])
