"""CLI subcommands: each module defines HELP, configure(parser) and main(args) -> int (see cli.py)."""
