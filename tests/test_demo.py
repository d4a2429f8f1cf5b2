"""``kdiff-align demo --quick`` end to end on the shipped Fashion-MNIST model."""
import json

import numpy as np
from PIL import Image

from kdiff_align.apps import demo
from kdiff_align.apps.cli import main

REWARDS = ["logit 'bag'", "-JPEG kB"]


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    methods, baselines = list(demo.methods()), list(demo.constrained_baselines())
    for name in methods + baselines:
        assert (tmp_path / f"{demo.slug(name)}.png").stat().st_size > 1000
    assert (tmp_path / "reward_vs_nfe.png").stat().st_size > 1000
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(r["method"], r["reward"]) for r in results} == {(m, r) for m in methods + baselines for r in REWARDS}
    by_key = {(r["method"], r["reward"]): r for r in results}
    assert {by_key[m, r]["kind"] for m in baselines for r in REWARDS} == {"constrained"}
    assert {by_key[m, r]["kind"] for m in methods for r in REWARDS} == {"reward"}
    # --quick: 5 Heun steps = 9 evaluations per image (the last step is Euler); best-of-4 pays 4×.
    assert by_key["plain", "-JPEG kB"]["nfe"] == 9 and by_key["best-of-4", "-JPEG kB"]["nfe"] == 36
    for reward in REWARDS:
        # best-of-4's pool contains plain's sample from the same x_T, so it can only be better; the
        # 1e-3 slack covers the float differences of evaluating that sample in a larger batch.
        assert by_key["best-of-4", reward]["mean"] >= by_key["plain", reward]["mean"] - 1e-3
    out = capsys.readouterr().out
    assert all(name in out for name in methods + baselines) and "NFE/img" in out
    assert "constrained baseline" in out and "ignores the reward" in out
    assert not list(tmp_path.glob("*.tmp"))


def test_inpainting_grid_shows_the_constraint(tmp_path):
    """The baseline's completions keep the fixed left half, and the grid's first row shows that half."""
    import torch
    pipe = demo.toy.load("fashion")
    x_T = pipe.get_init_latent(2, torch.Generator().manual_seed(0))
    x0, nfe, constraint = demo.newton_inpainting(pipe, x_T, torch.Generator().manual_seed(1), True, 20)
    mask = constraint["mask"].bool().expand_as(x0)
    # The demo's 20 steps × 3 Newton iterations: the fixed half's mean error was 0.006 on 8 images (max
    # 0.08); 0.05 is 2.5 % of the pixel range [-1, 1].
    assert (x0 - constraint["known"])[mask].abs().mean() < 0.05
    assert mask[..., :14].all() and not mask[..., 14:].any()
    scores = {"a": torch.zeros(2), "b": torch.ones(2)}
    demo.save_constraint_grid(constraint["known"], constraint["mask"], x0, scores, tmp_path / "g.png", "t")
    with Image.open(tmp_path / "g.png") as im:
        assert np.asarray(im.convert("L")).std() > 10  # a drawn figure, not a blank canvas
    assert nfe > 0
