"""``python -m qwen_serve_client``: the qwen-serve command line."""

import sys

from qwen_serve_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
