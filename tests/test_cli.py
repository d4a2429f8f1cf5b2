import pytest

from kdiff_align.cli import main


@pytest.mark.parametrize("command", ["demo", "demon", "generate"])
def test_subcommands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: kdiff-align " + command in capsys.readouterr().out


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    assert exit_info.value.code == 2
