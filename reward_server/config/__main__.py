"""`python -m reward_server.config --doc > docs/configuration.md`."""

import sys

from .doc import config_doc

if __name__ == "__main__":
    if sys.argv[1:] != ["--doc"]:
        sys.exit("usage: python -m reward_server.config --doc > docs/configuration.md")
    sys.stdout.write(config_doc())
