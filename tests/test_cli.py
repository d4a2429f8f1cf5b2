from kdiff_align.cli import main


def test_demo_quick_writes_png(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "mixture_samples.png").stat().st_size > 1000
    assert "odeint heun" in capsys.readouterr().out
