"""Run one party of a consortium: ``python parties/party.py CONFIG --name NAME``.

The same as ``mpc-lm party CONFIG --name NAME``; every role is data in the
config, so this one entry point serves the model owner, data owners, compute
parties and the dealer alike.
"""

import sys

from mpc_lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["party", *sys.argv[1:]]))
