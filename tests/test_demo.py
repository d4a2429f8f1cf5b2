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


def test_the_plot_keeps_its_legend_off_the_points_and_labels_ticks_in_plain_numbers():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [dict(method=m, reward=r, kind=k, mean=mean, sem=0.1, nfe=nfe) for r in REWARDS
            for m, k, mean, nfe in (("plain", "reward", 0.0, 39), ("best-of-4", "reward", 1.0, 156),
                                    ("demon K=4", "reward", 2.0, 163), ("Newton inpaint", "constrained", 0.5, 180))]
    fig = demo.reward_plot(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, = fig.legends
    box = legend.get_window_extent(renderer)
    assert all(not box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)  # outside every panel
    for ax in fig.axes:
        shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and 39 <= t.get_position()[0] <= 180]
        assert shown == ["40", "80", "160"], shown  # not 4×10¹
    plt.close(fig)


def test_file_names_rows_and_notes(capsys):
    """Lower-case file names without '='; a method that ignores the reward has one row of images, labelled so;
    a warning a method raised is a note of the summary, not a Python warning."""
    import torch
    assert [demo.slug(n) for n in ("demon K=4", "SMC N=4", "best-of-4", "Newton inpaint")] == \
        ["demon-k4", "smc-n4", "best-of-4", "newton-inpaint"]
    x, y = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    scores = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}
    (label, _, titles), = demo.grid_rows({"a": x, "b": x.clone()}, scores)
    assert "same samples for every reward" in label and titles == ["1.00\n3.00", "2.00\n4.00"]
    assert [row[0] for row in demo.grid_rows({"a": x, "b": y}, scores)] == ["a", "b"]
    row = {**demo._row("SMC N=4", "a", torch.ones(3), 20, 0.1, "reward"), "notes": ["heavy-tailed SMC weights"]}
    demo.print_table([row])
    out = capsys.readouterr().out
    assert "s/img" in out and "note: SMC N=4, a: heavy-tailed SMC weights" in out


def test_a_methods_warning_becomes_a_note_of_the_summary(tmp_path, monkeypatch):
    import warnings

    def warns(*args):
        warnings.warn("heavy-tailed SMC weights (a stand-in)", UserWarning)
        return demo.plain(*args)

    monkeypatch.setattr(demo, "methods", lambda: {"warns": warns})
    monkeypatch.setattr(demo, "constrained_baselines", lambda: {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping the demo would fail here
        results = demo.run(tmp_path, quick=True, disable=True)
    assert [r["notes"] for r in results] == [["heavy-tailed SMC weights (a stand-in)"]] * 2
