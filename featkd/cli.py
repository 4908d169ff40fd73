"""The ``featkd`` command line.

Each subcommand lives in its own module under ``featkd.commands`` with two
functions, ``add_arguments(parser)`` and ``run(args) -> int``. Only the module
of the subcommand being run is imported, so ``featkd --help`` and the quick
commands start without paying for the heavy ones.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from importlib import import_module

# name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "layers": ("featkd.commands.layers", "list every hookable layer of a model with its output shape"),
    "train": ("featkd.commands.train", "train a model (teacher or student) with cross-entropy"),
    "distill": ("featkd.commands.distill", "distill a trained teacher into a student from a config"),
    "eval": ("featkd.commands.eval", "evaluate a checkpoint on a dataset split"),
    "dml": ("featkd.commands.dml", "Deep Mutual Learning: K peers trained together"),
    "born-again": ("featkd.commands.born_again", "Born-Again Networks: N generations of self-distillation"),
    "adversarial": ("featkd.commands.adversarial", "adversarial KD with a conditional discriminator"),
    "sweep": ("featkd.commands.sweep", "run many student configurations against one shared teacher"),
    "plot": ("featkd.commands.plot", "plot ablations, sweeps, curves and attention maps from run directories"),
    "repro": ("featkd.commands.repro", "run a paper_repro protocol (AT/NST tables, omitted class)"),
    "demo": ("featkd.commands.demo", "the README's main job: a small distillation comparison on Fashion-MNIST"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: featkd <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run 'featkd <command> --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(f"featkd: unknown command {name!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, description = COMMANDS[name]
    module = import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"featkd {name}", description=description)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
