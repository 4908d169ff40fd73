"""The ``featkd`` command line.

Each subcommand is a module of ``featkd.commands`` (``born_again.py`` is ``featkd born-again``) with
two functions, ``add_arguments(parser)`` and ``run(args) -> int``, and a docstring whose first line
``featkd --help`` shows: a new command is a new module there. Only the module of the subcommand being
run is imported (the list reads the docstrings without importing), so ``featkd --help`` and the quick
commands start without paying for the heavy ones.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import warnings
from importlib import import_module
from pathlib import Path

COMMANDS_DIR = Path(__file__).resolve().parent / "commands"


def command_names() -> list[str]:
    """Every subcommand, from the module names in ``featkd/commands`` (modules starting with ``_`` are shared code)."""
    return sorted(p.stem.replace("_", "-") for p in COMMANDS_DIR.glob("*.py") if not p.stem.startswith("_"))


def description(name: str) -> str:
    """The first line of the command module's docstring, without its ````featkd name ...``:`` lead-in."""
    path = COMMANDS_DIR / f"{name.replace('-', '_')}.py"
    first = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").split("\n", 1)[0]
    first = re.sub(r"^``featkd [^`]*``:\s*", "", first)
    return re.sub(r"\s*\(see [^)]*\)", "", first).rstrip(".")


def _usage() -> str:
    names = command_names()
    width = max(map(len, names))
    lines = ["usage: featkd <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {description(name)}" for name in names]
    lines += ["", "Run 'featkd <command> --help' for the options of one command; set FEATKD_DEBUG=1 to see the",
              "traceback behind an error message."]
    return "\n".join(lines)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """featkd's own warnings (an unverifiable checkpoint...) as one line; others as Python shows them."""
    if category.__module__.startswith("featkd."):
        return f"featkd: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    names = command_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(f"featkd: unknown command {name!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    from featkd.provenance import code_state

    code_state()  # the code this command runs, found before it loads: the checkout may move while it runs
    module = import_module(f"featkd.commands.{name.replace('-', '_')}")
    parser = argparse.ArgumentParser(prog=f"featkd {name}", description=description(name))
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
