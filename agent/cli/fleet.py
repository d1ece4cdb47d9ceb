"""``edge-agent fleet keygen | sign | send``: the operator's side of fleet commands.

Runs on an operator's machine (or in the cloud), never needs a gateway config: ``keygen`` writes
a private key file (mode 0600) and prints the public half as the ``[[commands.trusted_keys]]``
entry the gateways need; ``sign`` prints a signed command envelope or a signed artifact
document; ``send`` publishes a command to one gateway or many and collects the replies within
``--timeout``. The private key is never printed or logged.

Exit codes: 0 every gateway answered ok; 1 a gateway refused, failed or did not answer (or the
broker could not be reached); 2 bad usage (a key file, arguments or a document that cannot be
used).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import sys
from pathlib import Path
from typing import Any, Final

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
GATEWAY_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_DOCUMENT_BYTES: Final = 64 * 1024
MAX_GATEWAY_FILE_BYTES: Final = 8 * 1024 * 1024


class UsageError(Exception):
    pass


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fleet", help="cloud side: make keys, sign and send commands to gateways")
    cmds = p.add_subparsers(dest="fleet_command", required=True)

    kg = cmds.add_parser("keygen", help="make a signing key; print the gateways' trusted_keys "
                                        "entry")
    kg.add_argument("--id", required=True, dest="key_id", help="key id, e.g. ops-2026")
    kg.add_argument("--out", required=True, help="private key file to write (mode 0600)")
    kg.add_argument("--json", action="store_true", help="machine-readable output")
    kg.set_defaults(func=cmd_keygen)

    sg = cmds.add_parser("sign", help="print a signed command, or a signed artifact document")
    sg.add_argument("--key", required=True, help="private key file (fleet keygen)")
    sg.add_argument("what", help="command name (with --gateway), or a JSON document (with "
                                 "--domain)")
    sg.add_argument("--gateway", help="the gateway the command is for")
    sg.add_argument("--args", default="{}", help="command args as a JSON object")
    sg.add_argument("--id", dest="req_id", help="command id (default: random)")
    sg.add_argument("--lifetime", type=float, default=3600.0,
                    help="seconds until the command expires (default 3600)")
    sg.add_argument("--domain", choices=["model", "firmware", "config"],
                    help="sign the JSON document file WHAT for this artifact domain")
    sg.set_defaults(func=cmd_sign)

    sd = cmds.add_parser("send", help="publish a command to gateways and collect the replies")
    sd.add_argument("name", help="command name, e.g. model.activate")
    sd.add_argument("--gateway", action="append", default=[], help="a gateway id (repeatable)")
    sd.add_argument("--gateways-file", help="file of gateway ids, one a line")
    sd.add_argument("--args", default="{}", help="command args as a JSON object")
    sd.add_argument("--key", help="private key file; unsigned without it")
    sd.add_argument("--host", default="127.0.0.1", help="broker host")
    sd.add_argument("--port", type=int, default=1883, help="broker port")
    sd.add_argument("--prefix", default="edge", help="topic prefix of the gateways")
    sd.add_argument("--credentials-file", default="", help="user name and password, two lines")
    sd.add_argument("--ca-file", default="", help="CA bundle; turns TLS on")
    sd.add_argument("--tls", action="store_true", help="TLS with the system trust store")
    sd.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for replies")
    sd.add_argument("--lifetime", type=float, default=3600.0,
                    help="seconds until the command expires (default 3600)")
    sd.add_argument("--json", action="store_true", help="machine-readable output")
    sd.set_defaults(func=cmd_send)


def _guarded(fn: Any, args: argparse.Namespace) -> int:
    try:
        code: int = fn(args)
        return code
    except UsageError as exc:
        print(f"fleet {args.fleet_command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_keygen(args: argparse.Namespace) -> int:
    return _guarded(_keygen, args)


def cmd_sign(args: argparse.Namespace) -> int:
    return _guarded(_sign, args)


def cmd_send(args: argparse.Namespace) -> int:
    return _guarded(_send, args)


def _keygen(args: argparse.Namespace) -> int:
    from agent.fleet.signing import KEY_ID_PATTERN, SigningKey

    if not re.match(KEY_ID_PATTERN, args.key_id):
        raise UsageError(f"--id {args.key_id[:64]!r}: letters, digits, '_', '.', '-', at most "
                         "64")
    key = SigningKey.generate(args.key_id)
    try:
        key.save(Path(args.out))
    except FileExistsError:
        raise UsageError(f"{args.out}: exists; a key file is never overwritten") from None
    except OSError as exc:
        raise UsageError(f"{args.out}: cannot write: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps({"id": key.key_id, "public_key": key.public, "file": args.out}))
    else:
        print(f"wrote the private key to {args.out} (keep it off the gateways)\n"
              "add this to every gateway's config:\n\n"
              f'[[commands.trusted_keys]]\nid = "{key.key_id}"\npublic_key = "{key.public}"')
    return EXIT_OK


def _load_key(path: str) -> Any:
    from agent.fleet.signing import SigningKey

    try:
        return SigningKey.load(Path(path))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such key file") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a usable key file: {exc}") from None


def _json_object(text: str, what: str) -> dict[str, Any]:
    from agent.jsontext import JsonRefused
    from agent.jsontext import parse as parse_json

    try:
        value = parse_json(text, max_bytes=MAX_DOCUMENT_BYTES)
    except JsonRefused as exc:
        raise UsageError(f"{what}: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what}: must be a JSON object")
    return value


def _gateway(text: str) -> str:
    if not GATEWAY_PATTERN.match(text):
        raise UsageError(f"gateway id {text[:64]!r}: letters, digits, '_', '.', '-', at most 64")
    return text


def _sign(args: argparse.Namespace) -> int:
    from agent.fleet.tool import command, sign_document

    key = _load_key(args.key)
    if args.domain:
        path = Path(args.what)
        try:
            if path.stat().st_size > MAX_DOCUMENT_BYTES:
                raise UsageError(f"{path}: larger than {MAX_DOCUMENT_BYTES} bytes")
            raw = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
        print(json.dumps(sign_document(key, args.domain, _json_object(raw.decode(
            "utf-8", "surrogateescape"), str(path))), indent=2))
        return EXIT_OK
    if not args.gateway:
        raise UsageError("a command is signed for one gateway: give --gateway")
    try:
        env = command(args.what, _json_object(args.args, "--args"), gateway=_gateway(args.gateway),
                      key=key, req_id=args.req_id, lifetime_s=args.lifetime)
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    print(json.dumps(env))
    return EXIT_OK


def _gateways(args: argparse.Namespace) -> list[str]:
    names = list(args.gateway)
    if args.gateways_file:
        path = Path(args.gateways_file)
        try:
            if path.stat().st_size > MAX_GATEWAY_FILE_BYTES:
                raise UsageError(f"{path}: larger than {MAX_GATEWAY_FILE_BYTES} bytes")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: cannot read: {exc}") from None
        names += [line.strip() for line in text.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise UsageError("no gateways: give --gateway or --gateways-file")
    return [_gateway(n) for n in names]


def _broker(args: argparse.Namespace) -> Any:
    from agent.fleet.tool import Broker
    from agent.uplink.tls import UplinkConfigError, read_credentials

    try:
        creds = read_credentials(args.credentials_file)
    except UplinkConfigError as exc:
        raise UsageError(str(exc).removeprefix("mqtt.credentials_file: ")) from None
    tls: ssl.SSLContext | None = None
    if args.ca_file or args.tls:
        try:
            tls = ssl.create_default_context(cafile=args.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--ca-file {args.ca_file}: {exc}") from None
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: not a port")
    return Broker(args.host, args.port, creds[0] if creds else None,
                  creds[1] if creds else None, tls)


def _send(args: argparse.Namespace) -> int:
    from agent.fleet.tool import SendFailed, send

    gateways = _gateways(args)
    cmd_args = _json_object(args.args, "--args")
    key = _load_key(args.key) if args.key else None
    broker = _broker(args)
    if not 0 < args.timeout <= 3600:
        raise UsageError("--timeout: 0 < seconds <= 3600")
    try:
        out = asyncio.run(send(broker, args.prefix, gateways, args.name, cmd_args, key=key,
                               timeout_s=args.timeout, lifetime_s=args.lifetime))
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    except SendFailed as exc:
        print(f"fleet send: {exc}", file=sys.stderr)
        return EXIT_FAIL
    report = out.as_json()
    if args.json:
        print(json.dumps(report))
    else:
        for gw, body in sorted(out.results.items()):
            if body.get("ok") is True:
                print(f"{gw}: ok {json.dumps(body.get('result'))[:200]}")
            else:
                err = body.get("error") or {}
                # What a gateway says is escaped: no control characters reach the terminal.
                print(f"{gw}: {json.dumps(err.get('code'))}: "
                      f"{json.dumps(str(err.get('message')))[:200]}")
        for gw in out.missing:
            print(f"{gw}: no reply within {args.timeout:g} s")
        print(f"{report['ok']} ok, {report['failed']} failed, {len(out.missing)} missing "
              f"of {report['sent']}")
    return EXIT_OK if report["ok"] == report["sent"] else EXIT_FAIL
