"""Help that teaches: every option says what it does and its default; the version; where tracebacks are."""

import pytest
import typer
from typer.testing import CliRunner

from moe_sparsify import __version__
from moe_sparsify.cli import app

runner = CliRunner()
COMMANDS = ("calibrate", "prune", "export", "eval", "skip-profile")


def _options(command: str):
    group = typer.main.get_command(app)
    cmd = group.commands[command]
    return [p for p in cmd.params if p.name != "help" and getattr(p, "param_type_name", "") == "option"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_says_what_it_does_and_its_default(command):
    options = _options(command)
    assert options
    for option in options:
        assert option.help and len(option.help) > 20, option.name
        assert "[default: " in option.help or "[required]" in option.help or "(required" in option.help, option.help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_bool_placeholder(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout


def test_export_says_what_its_calibration_flags_are_for():
    by_name = {o.name: o.help for o in _options("export")}
    for name in ("calibration", "seq_len", "seed"):
        assert "export is checked on" in by_name[name]


def test_version_and_the_traceback_variable():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"moe-sparsify {__version__}"
    top = runner.invoke(app, ["--help"])
    assert "MOE_SPARSIFY_TRACEBACK=1" in top.stdout


def test_command_descriptions_fit_the_command_list():
    """click shows a command's first sentence in the list; one that does not fit is cut with '...'."""
    top = runner.invoke(app, ["--help"]).stdout
    listed = top.split("Commands:")[1]
    for command in COMMANDS:
        line = next(line for line in listed.splitlines() if line.strip().startswith(command))
        assert not line.endswith("..."), line


def test_shipped_configs_resolve_by_name(tmp_path, monkeypatch):
    from moe_sparsify.config import find_config, resolve_settings
    from moe_sparsify.errors import UsageError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-keep6").mkdir()  # the checkpoint `prune --keep 6` writes: a directory, not a config
    assert resolve_settings("tiny-keep6", {}).keep == 6
    with pytest.raises(UsageError, match="not found; .*tiny-keep6"):
        find_config("no-such-config")
