"""Firmware update over the bridge link (PROTOCOL.md, "Firmware update").

::

    FW_BEGIN(size, version, sha256) -> FW_STATUS(offset)   the device erases, or resumes
    FW_CHUNK(offset, data) x N      -> FW_STATUS(offset)   ``window`` chunks in flight
    FW_END                          -> FW_STATUS(VERIFIED) or NAK VERIFY_FAILED
    FW_COMMIT                       -> ACK, reboot into the new slot on trial
    HELLO (unsolicited)                                    new version: done;
                                                           ROLLED_BACK: the new image failed

The device reports how many bytes it holds without a gap; a transfer that was interrupted
(unplug, host restart) resumes from there when the same image is offered again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from drivers.base import ProtocolError
from firmware_bridge.client import BridgeClient
from firmware_bridge.errors import (
    BridgeError,
    Rejected,
    RequestTimeout,
    RolledBack,
    UpdateError,
    VerifyFailed,
)
from firmware_bridge.image import parse_header, version_str
from firmware_bridge.messages import (
    MAX_CHUNK_BYTES,
    Ack,
    FwAbort,
    FwBegin,
    FwChunk,
    FwCommit,
    FwEnd,
    FwQuery,
    FwState,
    FwStatus,
    Hello,
    HelloFlag,
    NakCode,
    Version3,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes the device holds without a gap, image size)


@dataclass(frozen=True, slots=True)
class UpdateTimeouts:
    erase_s: float = 10.0  # FW_BEGIN erases the slot: allow for it per attempt
    verify_s: float = 10.0  # FW_END hashes the whole slot
    boot_s: float = 15.0  # COMMIT -> HELLO, including a rollback after the trial timeout


@dataclass(frozen=True, slots=True)
class FlashResult:
    version: Version3
    size: int
    resumed_from: int  # bytes the device already held when this run began
    bytes_sent: int
    elapsed_s: float
    hello: Hello


async def query(client: BridgeClient) -> FwStatus:
    return await client.link.request(FwQuery(), FwStatus)


async def abort(client: BridgeClient) -> None:
    await client.link.request(FwAbort(), Ack)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def flash(client: BridgeClient, image: bytes, *, window: int = 8,
                progress: Progress | None = None,
                timeouts: UpdateTimeouts | None = None) -> FlashResult:
    """Transfer, verify and commit ``image``; return once the device runs it.

    Raises VerifyFailed (the device refused the image; its update state is cleared so the next
    attempt starts from zero), RolledBack (the image did not boot), LinkDown/RequestTimeout
    (interrupted: call again with the same image to resume).
    """
    t = timeouts or UpdateTimeouts()
    header = parse_header(image)
    started = time.monotonic()
    link = client.link
    status = await link.request(FwBegin(len(image), header.version,
                                        hashlib.sha256(image).digest()),
                                FwStatus, min_ack_timeout_s=t.erase_s)
    chunk = status.chunk
    if not 0 < chunk <= MAX_CHUNK_BYTES:
        raise ProtocolError(f"device asks for {chunk}-byte chunks (1..{MAX_CHUNK_BYTES})",
                            where=client.where)
    resumed_from = min(status.offset, len(image))
    if resumed_from:
        log.info("%s: resuming the update of %s at byte %d of %d", client.where,
                 version_str(header.version), resumed_from, len(image))
    held = resumed_from
    sent = 0
    if progress is not None:
        progress(held, len(image))
    offsets: Iterator[int] = iter(range(resumed_from - resumed_from % chunk, len(image), chunk))

    async def worker() -> None:
        nonlocal held, sent
        for offset in offsets:
            data = image[offset:offset + chunk]
            st = await link.request(FwChunk(offset, data), FwStatus)
            sent += len(data)
            if st.offset > held:
                held = st.offset
                if progress is not None:
                    progress(held, len(image))

    try:
        async with asyncio.TaskGroup() as tg:
            for i in range(max(1, window)):
                tg.create_task(worker(), name=f"bridge-flash-{i}:{client.where}")
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from None

    try:
        done = await link.request(FwEnd(), FwStatus, min_ack_timeout_s=t.verify_s)
    except Rejected as exc:
        if exc.code != NakCode.VERIFY_FAILED:
            raise
        try:
            await abort(client)
        except BridgeError as abort_exc:
            log.warning("%s: could not abort the refused update: %s", client.where, abort_exc)
        raise VerifyFailed(f"device refused the image: {exc.detail}", where=client.where) from None
    if done.state != FwState.VERIFIED:
        raise UpdateError(f"FW_END left the update in state {done.state.name}",
                          where=client.where)

    boot = asyncio.get_running_loop().create_task(client.wait_boot(t.boot_s),
                                                  name=f"bridge-wait-boot:{client.where}")
    try:
        try:
            await link.request(FwCommit(), Ack)
        except (Rejected, RequestTimeout) as exc:
            # The ACK can be lost while the device already reboots; its HELLO decides.
            log.debug("%s: FW_COMMIT: %s; waiting for HELLO", client.where, exc)
        hello = await boot
    except TimeoutError:
        raise UpdateError(f"device did not say HELLO within {t.boot_s} s after COMMIT",
                          where=client.where) from None
    finally:
        if not boot.done():
            boot.cancel()
    if hello.flags & HelloFlag.ROLLED_BACK or hello.firmware != header.version:
        raise RolledBack(f"image {version_str(header.version)} did not start; the device runs "
                         f"{version_str(hello.firmware)} again", where=client.where)
    await client.wait_ready(t.boot_s)
    return FlashResult(header.version, len(image), resumed_from, sent,
                       time.monotonic() - started, hello)
