"""CLI subcommands: each module defines HELP, configure(parser) and main(args) -> int (see cli.py).

The rule of this layer: a command module imports at its top only what is light (the standard library, argparse
helpers, `hub`, `fileio`); everything that imports torch, yaml or the run machinery is imported inside the
function that needs it, so listing the commands and most `COMMAND --help` never import torch. Those imports carry
no comment each; this docstring is their reason (`tests/test_structure.py` exempts this package).
"""
