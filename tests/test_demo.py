"""``kdiff-align demo --quick`` end to end on the shipped Fashion-MNIST model."""
import json

from kdiff_align import demo
from kdiff_align.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    methods = list(demo.methods())
    for name in methods:
        assert (tmp_path / f"{name.replace(' ', '_').replace('/', '_')}.png").stat().st_size > 1000
    assert (tmp_path / "reward_vs_nfe.png").stat().st_size > 1000
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(r["method"], r["reward"]) for r in results} == {(m, r) for m in methods for r in
                                                            ["logit 'bag'", "-JPEG kB"]}
    by_key = {(r["method"], r["reward"]): r for r in results}
    # --quick: 5 Heun steps = 9 evaluations per image (the last step is Euler); best-of-4 pays 4×.
    assert by_key["plain", "-JPEG kB"]["nfe"] == 9 and by_key["best-of-4", "-JPEG kB"]["nfe"] == 36
    for reward in ["logit 'bag'", "-JPEG kB"]:
        # best-of-4's pool contains plain's sample from the same x_T, so it can only be better; the
        # 1e-3 slack covers the float differences of evaluating that sample in a larger batch.
        assert by_key["best-of-4", reward]["mean"] >= by_key["plain", reward]["mean"] - 1e-3
    out = capsys.readouterr().out
    assert all(name in out for name in methods) and "NFE/img" in out
    assert not list(tmp_path.glob("*.tmp"))
