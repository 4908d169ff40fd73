"""One module per featkd subcommand (see featkd/cli.py)."""
