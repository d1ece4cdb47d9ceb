#!/usr/bin/env python3
"""Install (or, with ``--uninstall``, remove) the edge-agent service from a source checkout.

The same code as ``edge-agent install-service``, for preparing an image from a checkout
without installing the package on the build host first, e.g.::

    sudo python3 systemd/install.py --root /mnt/rootfs --exec /opt/edge-agent/bin/edge-agent

Every option of ``edge-agent install-service --help`` applies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The checkout's own code, whether or not the package is installed on this host.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.cli import service as cli_service
from agent.cli.main import build_parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "install-service"
    if "--uninstall" in argv:
        argv.remove("--uninstall")
        command = "uninstall-service"
    parser = argparse.ArgumentParser(prog="install.py")
    cli_service.register(parser.add_subparsers(dest="command"))
    # The shell completion it installs covers every edge-agent command.
    parser.set_defaults(full_parser=lambda: build_parser(None))
    args = parser.parse_args([command, *argv])
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
