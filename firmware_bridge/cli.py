"""``edge-agent firmware ...``: look at a bridge MCU and update its firmware.

- ``firmware info DEVICE``: versions, UID, uptime, update state and link statistics.
- ``firmware flash DEVICE IMAGE``: transfer, verify, commit; resumes an interrupted transfer
  from the offset the device reports; a progress bar on a terminal, plain lines when piped.
  Before the first byte of the image is sent, ``firmware_bridge.authorize`` checks its
  signature (``IMAGE.sig``) against the trusted keys (``--trusted-keys FILE`` or the agent
  config's ``[commands]`` keys, ``-c``), the board id (``--board``) and the version against
  what the device runs and the floor recorded for it (``--state-dir``, or beside the agent's
  outbox with ``-c``); a refusal exits 2 with its reason. An unsigned image needs
  ``--allow-unsigned``, which is logged.
- ``firmware pack BODY OUT --version X.Y.Z [--sign KEYFILE --board ID]``: wrap a raw binary into
  an image with its header; with ``--sign``, write ``OUT.sig`` beside it.

DEVICE is a serial path or ``emulated`` (an emulated MCU that lives for the command).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

from agent import jsontext
from firmware_bridge import update
from firmware_bridge.authorize import (
    BOARD_PATTERN,
    SIGNATURE_SUFFIX,
    FirmwareRefused,
    FirmwareState,
    FlashPolicy,
    approve,
    read_trusted_keys,
    sign_image,
)
from firmware_bridge.client import DEFAULT_BAUDRATE, BridgeClient, ClientConfig
from firmware_bridge.emulator import BridgeEmulator
from firmware_bridge.errors import BridgeError, LinkDown, RequestTimeout, UpdateError
from firmware_bridge.image import build_image, parse_header, parse_version, version_str
from firmware_bridge.link import LinkConfig
from firmware_bridge.messages import FwState, HelloFlag

EMULATED = "emulated"
EXIT_REFUSED = 2  # like any input the command refuses
STATE_FILE = "firmware-state.json"
MAX_FILE_BYTES = 16 * 1024 * 1024  # a bridge MCU's flash slot is far smaller
BAUDRATES = (1_200, 4_000_000)  # what USB-serial bridges and MCU UARTs can be set to
MAX_SECONDS = 3600.0


def _baudrate(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a whole number") from None
    if not BAUDRATES[0] <= value <= BAUDRATES[1]:
        raise argparse.ArgumentTypeError(f"{value} is outside {BAUDRATES[0]}..{BAUDRATES[1]}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text[:20]} is outside 0..{MAX_SECONDS:g} s")
    return value


def read_file(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A regular file of at most ``limit`` bytes (OSError otherwise): a FIFO must not hang
    the command and /dev/zero must not fill the memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        if st.st_size > limit:
            raise OSError(0, f"{st.st_size} bytes, more than {limit}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise OSError(0, f"more than {limit} bytes")
        return data
    finally:
        os.close(fd)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fw = sub.add_parser("firmware", help="inspect and update a bridge microcontroller")
    cmds = fw.add_subparsers(dest="firmware_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("device", help='serial port of the MCU, or "emulated"')
        p.add_argument("--baudrate", type=_baudrate, default=DEFAULT_BAUDRATE)
        p.add_argument("--timeout", type=_seconds, default=2.0, metavar="S",
                       help="seconds to open the port and per request attempt")

    info = cmds.add_parser("info", help="versions, UID, uptime and link statistics")
    common(info)
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(func=cmd_info)

    flash = cmds.add_parser("flash", help="write a firmware image (resumes if interrupted)")
    common(flash)
    flash.add_argument("image", type=Path, help="firmware image file (see `firmware pack`)")
    flash.add_argument("--window", type=int, default=8, help="chunks in flight (1..32)")
    flash.add_argument("--boot-timeout", type=_seconds, default=15.0, metavar="S",
                       help="seconds for the new image to say HELLO after commit")
    flash.add_argument("--signature", type=Path, metavar="FILE",
                       help=f"the image's signature (default: IMAGE{SIGNATURE_SUFFIX})")
    keys = flash.add_mutually_exclusive_group()
    keys.add_argument("--trusted-keys", type=Path, metavar="FILE",
                      help="public keys to trust, KEY_ID PUBLIC_KEY per line")
    keys.add_argument("-c", "--config", type=Path, metavar="AGENT_TOML",
                      help="trust the agent config's [commands] keys; floor beside its outbox")
    flash.add_argument("--board", type=_board, help="this gateway's bridge board id")
    flash.add_argument("--state-dir", type=Path, metavar="DIR",
                       help="where the version floor per device and the refusals are kept")
    flash.add_argument("--allow-unsigned", action="store_true",
                       help="flash an image without a signature (technician only; logged)")
    flash.add_argument("--json", action="store_true",
                       help="no progress lines; print the result as one JSON object")
    flash.set_defaults(func=cmd_flash)

    pack = cmds.add_parser("pack", help="wrap a raw binary into a firmware image")
    pack.add_argument("body", type=Path)
    pack.add_argument("out", type=Path)
    pack.add_argument("--version", required=True, help="MAJOR.MINOR.PATCH")
    pack.add_argument("--sign", type=Path, metavar="KEYFILE",
                      help=f"sign the image with this key; writes OUT{SIGNATURE_SUFFIX}")
    pack.add_argument("--board", type=_board, help="the board the image is for (with --sign)")
    pack.add_argument("--json", action="store_true", help="print {file, version, bytes} as JSON")
    pack.set_defaults(func=cmd_pack)


def _error(args: argparse.Namespace, message: str) -> None:
    """A failure: ``error: ...`` on stdout, or ``{"ok": false, "error": ...}`` with --json."""
    if getattr(args, "json", False):
        print(jsontext.dumps({"ok": False, "error": message}))
    else:
        print(f"error: {message}")


def _board(text: str) -> str:
    import re

    if not re.fullmatch(BOARD_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text[:70]!r} is not a board id (letters, digits, "
                                         "_ . -, up to 64)")
    return text


def _policy_inputs(args: argparse.Namespace) -> tuple[dict[str, str], Path | None]:
    """The trusted keys and the floor file the options name; ValueError says what is wrong."""
    keys: dict[str, str] = {}
    state: Path | None = args.state_dir
    if args.trusted_keys is not None:
        try:
            text = read_file(args.trusted_keys, 64 * 1024).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--trusted-keys {args.trusted_keys}: cannot be read: {exc}") from None
        try:
            keys = read_trusted_keys(text)
        except ValueError as exc:
            raise ValueError(f"--trusted-keys {args.trusted_keys}: {exc}") from None
    elif args.config is not None:
        from agent.config.load import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            raise ValueError("; ".join(exc.lines()[:5])) from None
        keys = cfg.commands.trusted()
        if state is None:
            state = Path(cfg.outbox.path).parent
    return keys, (state / STATE_FILE if state is not None else None)


@asynccontextmanager
async def _connected(args: argparse.Namespace) -> AsyncIterator[BridgeClient]:
    emulator: BridgeEmulator | None = None
    port = str(args.device)
    if port == EMULATED:
        emulator = BridgeEmulator()
        await emulator.start()
        port = emulator.port
    link = LinkConfig(ack_timeout_s=min(1.6, args.timeout),
                      ack_timeout_max_s=max(3.2, args.timeout))
    try:
        client = await BridgeClient.open_serial(port, baudrate=args.baudrate,
                                                config=ClientConfig(link=link),
                                                open_timeout_s=args.timeout)
        try:
            await client.connect()
            yield client
        finally:
            await client.aclose()
    finally:
        if emulator is not None:
            await emulator.close()


def _run(args: argparse.Namespace, coro_fn: Callable[[], Awaitable[int]]) -> int:
    async def main() -> int:
        return await coro_fn()

    try:
        return asyncio.run(main())
    except (OSError, ValueError, OverflowError) as exc:  # the port or its driver refused
        _error(args, f"{type(exc).__name__}: {exc}")
        return 1


def cmd_info(args: argparse.Namespace) -> int:
    async def go() -> int:
        try:
            async with _connected(args) as client:
                rows, facts = await _facts(args.device, client)
        except BridgeError as exc:
            _error(args, str(exc))
            return 1
        if args.json:
            print(jsontext.dumps({"ok": True, **facts}, indent=2))
        else:
            _print_rows(rows, sys.stdout)
        return 0

    return _run(args, go)


async def _print_info(device: str, client: BridgeClient, out: TextIO) -> None:
    _print_rows(await _info(device, client), out)


def _print_rows(rows: dict[str, str], out: TextIO) -> None:
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key.replace('_', ' '):<{width}}  {value}", file=out)


async def _info(device: str, client: BridgeClient) -> dict[str, str]:
    """What ``firmware info`` shows, by name (the keys are the text's labels)."""
    return (await _facts(device, client))[0]


async def _facts(device: str, client: BridgeClient) -> tuple[dict[str, str], dict[str, Any]]:
    """``firmware info`` as text rows, and as typed values for ``--json``."""
    hello = client.hello
    assert hello is not None
    stats = await client.stats()
    fw = await update.query(client)
    uptime = client.device_uptime_s()
    flags = [(f.name or "").lower() for f in HelloFlag if f & hello.flags]
    rows = [
        ("device", device),
        ("protocol", str(hello.protocol)),
        ("firmware", f"{version_str(hello.firmware)} (slot {'AB'[hello.active_slot & 1]}, "
                     f"boot {hello.boot_count}{', ' + ', '.join(flags) if flags else ''})"),
        ("uid", hello.uid.hex()),
        ("capabilities", ", ".join((c.name or "").lower() for c in type(hello.capabilities)
                                   if c & hello.capabilities)),
        ("channels", ", ".join(f"{i} {k.name.lower()}" for i, k in enumerate(hello.channels))),
        ("uptime", f"{uptime:.1f} s" if uptime is not None else "unknown"),
        ("update", "idle" if fw.state == FwState.IDLE else
         f"{fw.state.name.lower()} {fw.offset}/{fw.size} bytes of {version_str(fw.version)}"),
    ]
    ls = client.link_stats()

    def n(key: str) -> int:
        return int(ls.get(key, 0))

    rtt = ls.get("rtt_s")
    link_text = f"rtt {rtt * 1e3:.2f} ms, " if rtt is not None else ""
    link_text += (f"ack timeout {ls['ack_timeout_s']:.2f} s, tx {n('tx_frames')}, rx "
                  f"{n('rx_frames')}, retransmits {n('retransmits')}, timeouts "
                  f"{n('timeouts')}, crc errors {n('crc_errors')}, bad frames "
                  f"{n('bad_frames') + n('cobs_errors')}, oversize {n('oversize')}, "
                  f"duplicates {n('duplicates')}")
    rows.append(("host link", link_text))
    if "clock_samples" in ls:
        rows.append(("clock", f"drift {ls['clock_drift_ppm']:+.1f} ppm from "
                     f"{n('clock_samples')} round trips (best "
                     f"{ls.get('clock_best_rtt_s', 0.0) * 1e3:.2f} ms)"))
    rows.append(("device link", f"rx {stats.rx_frames}, crc errors {stats.rx_crc_errors}, bad "
                 f"frames {stats.rx_bad_frames}, tx {stats.tx_frames}, retransmits "
                 f"{stats.retransmits}, duplicates {stats.duplicates}, reports dropped "
                 f"{stats.reports_dropped}"))
    facts: dict[str, Any] = {
        "device": device, "protocol": hello.protocol, "firmware": version_str(hello.firmware),
        "slot": "AB"[hello.active_slot & 1], "boot_count": hello.boot_count, "flags": flags,
        "uid": hello.uid.hex(),
        "capabilities": [(c.name or "").lower() for c in type(hello.capabilities)
                         if c & hello.capabilities],
        "channels": [k.name.lower() for k in hello.channels], "uptime_s": uptime,
        "update": {"state": fw.state.name.lower(), "offset": fw.offset, "size": fw.size,
                   "version": version_str(fw.version)},
        "host_link": {k: v for k, v in ls.items() if isinstance(v, int | float)},
        "device_link": {"rx_frames": stats.rx_frames, "rx_crc_errors": stats.rx_crc_errors,
                        "rx_bad_frames": stats.rx_bad_frames, "tx_frames": stats.tx_frames,
                        "retransmits": stats.retransmits, "duplicates": stats.duplicates,
                        "reports_dropped": stats.reports_dropped},
    }
    return {k.replace(" ", "_"): v for k, v in rows}, facts


class ProgressPrinter:
    """A bar redrawn in place on a terminal; one line per 10 % when the output is piped."""

    def __init__(self, out: TextIO, interactive: bool, width: int = 30) -> None:
        self.out = out
        self.interactive = interactive
        self.width = width
        self._last_step = -1

    def __call__(self, held: int, total: int) -> None:
        frac = held / total if total else 1.0
        if self.interactive:
            filled = round(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            self.out.write(f"\r[{bar}] {frac:6.1%} {held // 1024}/{total // 1024} KiB")
            self.out.flush()
            return
        step = int(frac * 10)
        if step != self._last_step:
            self._last_step = step
            print(f"flash: {frac:.0%} ({held}/{total} bytes)", file=self.out)

    def finish(self) -> None:
        if self.interactive:
            self.out.write("\n")
            self.out.flush()


def cmd_flash(args: argparse.Namespace) -> int:
    try:
        image = read_file(args.image)
        header = parse_header(image)
    except OSError as exc:
        _error(args, f"cannot read {args.image}: {exc.strerror}")
        return 2
    except UpdateError as exc:
        _error(args, f"{args.image}: {exc}")
        return 2
    if not 1 <= args.window <= 32:
        _error(args, f"--window {args.window} is outside 1..32")
        return 2
    sig_path: Path = args.signature or args.image.with_name(args.image.name + SIGNATURE_SUFFIX)
    try:
        signature = read_file(sig_path, 64 * 1024) if (args.signature or sig_path.exists()) \
            else None
        keys, state_path = _policy_inputs(args)
    except OSError as exc:
        _error(args, f"cannot read {sig_path}: {exc.strerror}")
        return 2
    except ValueError as exc:
        _error(args, str(exc))
        return 2
    from agent.fleet.signing import TrustedKeys

    memory = FirmwareState(state_path) if state_path is not None else None
    # With --json the only output is the result: progress goes nowhere.
    progress = ProgressPrinter(io.StringIO() if args.json else sys.stdout,
                               not args.json and sys.stdout.isatty())

    async def go() -> int:
        try:
            async with _connected(args) as client:
                hello = client.hello
                assert hello is not None
                floor = memory.floor(hello.uid) if memory is not None else None
                policy = FlashPolicy(TrustedKeys(keys), args.board, args.allow_unsigned, floor)
                # Every check before FW_BEGIN: nothing of a refused image reaches the device.
                approval = approve(image, signature, policy, hello.firmware)
                signer = (f"signed by {approval.signed_by}" if approval.signed_by
                          else "UNSIGNED (--allow-unsigned)")
                if not args.json:
                    print(f"flashing {version_str(header.version)} ({len(image)} bytes, "
                          f"{signer}) to {args.device}, running {version_str(hello.firmware)}")
                result = await update.flash(
                    client, image, window=args.window, progress=progress,
                    timeouts=update.UpdateTimeouts(boot_s=args.boot_timeout))
                if memory is not None:
                    memory.raise_floor(hello.uid, result.version)
        except FirmwareRefused as exc:
            if args.json:
                print(jsontext.dumps({"ok": False, "refused": True, "error": str(exc)}))
            else:
                print(f"refused: {exc}")
            if memory is not None:
                try:
                    memory.count_refusal(exc.reason)
                except (OSError, UpdateError) as state_exc:  # the refusal stands regardless
                    print(f"warning: the refusal was not counted: {state_exc}", file=sys.stderr)
            return EXIT_REFUSED
        except (LinkDown, RequestTimeout) as exc:
            progress.finish()
            _error(args, f"interrupted: {exc}; run the same command again to resume from "
                   "the offset the device reports")
            return 1
        except BridgeError as exc:
            progress.finish()
            _error(args, str(exc))
            return 1
        progress.finish()
        if args.json:
            print(jsontext.dumps({"ok": True, "version": version_str(result.version),
                                  "bytes_sent": result.bytes_sent,
                                  "elapsed_s": round(result.elapsed_s, 3),
                                  "resumed_from": result.resumed_from}))
            return 0
        resumed = f", resumed at byte {result.resumed_from}" if result.resumed_from else ""
        print(f"ok: the device runs {version_str(result.version)} (verified sha256, "
              f"{result.bytes_sent} bytes sent in {result.elapsed_s:.1f} s{resumed})")
        return 0

    return _run(args, go)


def cmd_pack(args: argparse.Namespace) -> int:
    try:
        version = parse_version(args.version)
        body = read_file(args.body)
    except ValueError as exc:
        _error(args, f"--version: {exc}")
        return 2
    except OSError as exc:
        _error(args, f"cannot read {args.body}: {exc.strerror}")
        return 2
    if (args.sign is None) != (args.board is None):
        _error(args, "--sign and --board go together (a signature names the board)")
        return 2
    image = build_image(version, body)
    signature: bytes | None = None
    if args.sign is not None:
        from agent.fleet.signing import SigningKey

        try:
            key = SigningKey.load(args.sign)
        except (OSError, ValueError) as exc:
            _error(args, f"--sign {args.sign}: {exc}")
            return 2
        signature = sign_image(image, args.board, key)
    sig_out = args.out.with_name(args.out.name + SIGNATURE_SUFFIX)
    try:
        args.out.write_bytes(image)
        if signature is not None:
            sig_out.write_bytes(signature)
    except OSError as exc:
        _error(args, f"cannot write {args.out}: {exc.strerror}")
        return 2
    if args.json:
        print(jsontext.dumps({"ok": True, "file": str(args.out), "version": version_str(version),
                              "bytes": len(image), "signature": str(sig_out) if signature
                              is not None else None}))
        return 0
    signed = f", signed for board {args.board} in {sig_out}" if signature is not None else ""
    print(f"{args.out}: image {version_str(version)}, {len(image)} bytes{signed}")
    return 0
