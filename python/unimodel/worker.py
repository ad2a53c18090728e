"""Entry point of a worker process: ``python -m unimodel.worker``.

Without arguments it speaks docs/worker-protocol.md on the descriptors the core passed
(control socket 3, input arena 4, output arena 5, or the ``UNIMODEL_*_FD`` variables).
``--inspect PLUGIN`` prints what the plugin declares as JSON and exits 0, or prints
``{"error", "traceback"}`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


def _inspect(spec: str) -> int:
    from .inspection import inspect_plugin
    from .runtime import describe

    try:
        doc = inspect_plugin(spec)
    except (Exception, SystemExit) as e:
        print(json.dumps({"error": describe(e), "traceback": traceback.format_exc()}))
        return 1
    print(json.dumps(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unimodel.worker",
        description="UniModel worker process (spawned by the core; see docs/worker-protocol.md)",
    )
    parser.add_argument(
        "--inspect", metavar="PLUGIN", help="print the models PLUGIN declares as JSON and exit"
    )
    args = parser.parse_args(argv)

    from . import logs

    logs.configure()
    if args.inspect is not None:
        return _inspect(args.inspect)

    from .runtime import serve

    return serve(
        int(os.environ.get("UNIMODEL_CONTROL_FD", "3")),
        int(os.environ.get("UNIMODEL_INPUT_ARENA_FD", "4")),
        int(os.environ.get("UNIMODEL_OUTPUT_ARENA_FD", "5")),
    )


if __name__ == "__main__":
    sys.exit(main())
