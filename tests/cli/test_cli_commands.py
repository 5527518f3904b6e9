"""The `effnet` command: one module under cli/ per area, every command with help that explains it."""
import pytest

from cli.main import COMMAND_MODULES, build_parser

COMMANDS = ["models", "bench", "export", "train", "train-many", "train-bench", "import-pretrained", "store",
            "evaluate", "predict", "serve", "loadtest", "report", "chaos", "soak", "experiment", "dashboard", "cascade",
            "keys", "worker", "rollout", "plan", "build"]


def _subcommands(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_command_comes_from_a_module_of_the_cli_package():
    assert all(name.startswith("cli.") for name in COMMAND_MODULES)
    assert list(_subcommands(build_parser())) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_a_description_and_every_option_a_help_text(command):
    sub = _subcommands(build_parser())[command]
    assert sub.description and len(sub.description) > 40, command
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"effnet {command} {action.option_strings[0]} has no help"
