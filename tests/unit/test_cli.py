
import pytest

from mbv2train import __version__


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mbv2train {__version__}"


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    assert "summary" in result.stdout and "config" in result.stdout


def test_every_command_has_help(cli):
    for command in (["summary"], ["config"], ["config", "show"]):
        result = cli(*command, "--help")
        assert result.exit_code == 0, command
        assert "Usage" in result.stdout


def test_bad_option_value_exits_2(cli):
    assert cli("summary", "--image-size", "0").exit_code == 2
    assert cli("summary", "--width-mult", "wide").exit_code == 2


def test_an_error_raised_while_ctrl_c_unwinds_is_still_an_interruption(capsys):
    # A second Ctrl-C can land inside a library's bookkeeping (seen with tqdm's lock), whose own cleanup
    # then fails: that must read as an interruption, exit 130, not a traceback.
    import typer

    from mbv2train.cli import reports_user_errors

    @reports_user_errors
    def command():
        try:
            raise KeyboardInterrupt
        finally:
            raise AttributeError("type object 'tqdm' has no attribute '_lock'")

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 130
    assert capsys.readouterr().err == "error: interrupted; nothing was saved for the current step\n"


def test_an_ordinary_error_is_not_mistaken_for_an_interruption():
    from mbv2train.cli import reports_user_errors

    @reports_user_errors
    def command():
        raise AttributeError("a bug")

    with pytest.raises(AttributeError):
        command()
