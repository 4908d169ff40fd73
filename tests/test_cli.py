"""The command list comes from the modules in featkd/commands: a new command is one new module."""

import importlib

from featkd import cli

SHIPPED = ["adversarial", "born-again", "demo", "distill", "dml", "eval", "layers", "pairs", "plot", "repro", "show",
           "sweep", "train", "tune"]


def test_every_command_module_is_a_command(capsys):
    assert cli.command_names() == SHIPPED
    for name in SHIPPED:
        module = importlib.import_module(f"featkd.commands.{name.replace('-', '_')}")
        assert callable(module.add_arguments) and callable(module.run)
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "  born-again   Born-Again Networks, N generations in one command\n" in usage
    assert "  train        train one model (a teacher, or a student without distillation) with cross-entropy\n" in usage


def test_a_new_module_is_listed_with_its_docstring(tmp_path, monkeypatch, capsys):
    (tmp_path / "_shared.py").write_text('"""Helpers, not a command."""\n')
    (tmp_path / "say_hello.py").write_text('"""``featkd say-hello NAME``: greet someone (see :mod:`x.y`).\n\nMore."""\n')
    monkeypatch.setattr(cli, "COMMANDS_DIR", tmp_path)
    assert cli.command_names() == ["say-hello"]
    assert cli.description("say-hello") == "greet someone"
    assert cli.main(["say-helo"]) == 2
    assert "Did you mean: say-hello?" in capsys.readouterr().err
