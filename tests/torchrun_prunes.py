"""Several `moe-sparsify prune` runs in one torchrun launch, for tests/test_cli.py (one launch instead of
one per run: each costs three interpreters importing torch).

Each rank joins the process group once, through `distributed.process_group` as `prune` itself does, then
runs the CLI for each argument list in the JSON list argv[1]; every prune finds the group joined and
shares its work over it. A failing run ends the launch with its exit code, leaving the group at once.
"""

import json
import sys

import torch

from moe_sparsify.cli import app
from moe_sparsify.distributed import process_group


def main() -> None:
    with process_group(torch.device("cpu")):
        for args in json.loads(sys.argv[1]):
            code = app(args, standalone_mode=False)
            if code:
                raise SystemExit(code)


if __name__ == "__main__":
    main()
