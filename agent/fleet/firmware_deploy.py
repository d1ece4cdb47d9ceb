"""``firmware.flash`` on the gateway: an image in chunks, checked, then flashed by the sensor.

The image and its signature file arrive as a ``model.deploy`` does (``agent.fleet.chunks``,
under ``firmware-deploys/`` beside the outbox; ``agent.fleet.firmware_args`` lists the steps).
Nothing reaches the microcontroller until ``commit``, and then only after
``firmware_bridge.authorize.approve`` passed with the gateway's policy: a signature by a key in
``[commands] trusted_keys``, the board id of the sensor's ``options.board``, a version not below
what the device runs nor below the floor this gateway recorded for that device. From the cloud
an unsigned image is never allowed.

The agent holds the serial port, so the image goes through the link the running bridge sensors
share (their hub): the device's reports keep flowing until it reboots into the new image, and
the client reconnects after its HELLO. Refusals are counted by reason here and, across runs, in
the same ``firmware-state.json`` that `firmware flash -c CONFIG` uses.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, get_args

from agent.config.schema import AgentConfig, SensorConfig
from agent.fleet.chunks import MISSING_LISTED, ChunkStore, DeployError, DeployHeader
from agent.fleet.firmware_args import MAX_IMAGE_BYTES, MAX_SIGNATURE_FILE
from agent.fleet.signing import TrustedKeys
from drivers.base import DriverError
from firmware_bridge import update
from firmware_bridge.authorize import (
    REFUSALS,
    FirmwareRefused,
    FirmwareState,
    FlashPolicy,
    Reason,
    approve,
)
from firmware_bridge.errors import LinkDown, RequestTimeout, UpdateError
from firmware_bridge.image import check_image, version_str
from firmware_bridge.messages import Version3
from firmware_bridge.sensor import running_hub

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
COMMAND: Final = "firmware.flash"
STATE_FILE: Final = "firmware-state.json"  # as `firmware flash -c CONFIG`
DRIVER: Final = "bridge"
DONE_KEPT: Final = 16  # results of finished commits, for a commit repeated after a timeout


class FirmwareDeployments:
    """The firmware images the cloud sends to this gateway's bridge microcontrollers.

    ``shared`` returns the running generation's ``BuildContext.shared`` (where the bridge hubs
    are), or None before the sensors are built."""

    def __init__(self, cfg: AgentConfig, shared: Callable[[], dict[str, Any] | None]) -> None:
        self.cfg = cfg
        self._shared = shared
        root = Path(cfg.outbox.path).parent
        self.chunks = ChunkStore(root / "firmware-deploys", MAX_IMAGE_BYTES + MAX_SIGNATURE_FILE,
                                 cfg.model_deploy.partial_expire_s, kind="firmware deploy")
        self.state = FirmwareState(root / STATE_FILE)
        self.counts: dict[str, int] = {"flashed": 0, "failed": 0}
        self.refused: dict[str, int] = {}
        self.last: dict[str, str] = {}  # sensor -> what happened to its device last
        self._flashing = asyncio.Lock()  # one image at a time on this gateway
        self._running: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._done: dict[str, dict[str, Any]] = {}  # deploy id -> its result, the latest few
        try:
            self.chunks.sweep()
        except OSError as exc:
            log.error("firmware deploys: cannot clean up expired deploys: %s", exc)

    def handlers(self) -> dict[str, Handler]:
        return {COMMAND: self._command}

    async def _command(self, args: dict[str, Any]) -> dict[str, Any]:
        op = args["op"]
        try:
            if op == "begin":
                return await asyncio.to_thread(self.begin, args)
            if op == "chunk":
                return await asyncio.to_thread(self.chunk, args)
            if op == "status":
                missing = await asyncio.to_thread(self.chunks.missing, args["deploy_id"])
                return {"deploy_id": args["deploy_id"], **_listed(missing)}
            return await self._commit(args["deploy_id"])
        except DeployError:
            self.counts["failed"] += 1
            raise
        except OSError as exc:  # a full or failing disk: say so, keep what is stored
            self.counts["failed"] += 1
            log.error("firmware deploy %s: %s: %s", args["deploy_id"], op, exc)
            raise DeployError(f"{op}: the gateway cannot write its disk: "
                              f"{exc.strerror or exc}") from None

    async def _commit(self, deploy_id: str) -> dict[str, Any]:
        """Run the commit in a task of its own, so that a command that runs out of time does
        not cut a flash short: a repeated commit waits for the same task, or gets its result."""
        if deploy_id in self._done:
            return self._done[deploy_id]
        task = self._running.get(deploy_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._flash(deploy_id),
                                                          name=f"firmware-flash:{deploy_id}")
            self._running[deploy_id] = task
            task.add_done_callback(lambda t: self._finished(deploy_id, t))
        return await asyncio.shield(task)

    def _finished(self, deploy_id: str, task: asyncio.Task[dict[str, Any]]) -> None:
        self._running.pop(deploy_id, None)
        if task.cancelled() or task.exception() is not None:  # retrieved: a retry retries
            return
        self._done[deploy_id] = task.result()
        while len(self._done) > DONE_KEPT:
            self._done.pop(next(iter(self._done)))

    async def aclose(self) -> None:
        """Stop a flash still running when the generation ends (the device keeps what it
        holds; the same image resumes from there)."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _flash(self, deploy_id: str) -> dict[str, Any]:
        async with self._flashing:
            return await self.commit(deploy_id)

    # -- refusals ------------------------------------------------------------------------------

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if reason in _REASONS:  # the state file keeps the image refusals, not wrong_gateway
            try:
                self.state.count_refusal(_REASONS[reason])
            except (OSError, UpdateError) as exc:  # the refusal stands regardless
                log.error("firmware: the %s refusal was not recorded: %s", reason, exc)

    def _refuse(self, reason: str, message: str) -> DeployError:
        REFUSALS[reason] += 1
        self._count(reason)
        log.warning("firmware.flash refused: %s: %s", reason, message)
        return DeployError(f"{reason}: {message}")

    # -- the steps -----------------------------------------------------------------------------

    def _sensor(self, name: str) -> SensorConfig:
        for s in self.cfg.sensors:
            if s.name == name and s.driver == DRIVER and s.enabled:
                return s
        bridges = [s.name for s in self.cfg.sensors if s.driver == DRIVER and s.enabled]
        raise DeployError(f"no enabled bridge sensor named {name[:64]!r} is configured here "
                          f"(bridge sensors: {', '.join(bridges) or 'none'})")

    def begin(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["gateway"] not in ("*", self.cfg.gateway.id):
            raise self._refuse("wrong_gateway", f"the image is sent for gateway "
                                                f"{args['gateway'][:64]!r}, not this one")
        if args["signature_sha256"] is None or args["signature_size"] is None:
            raise self._refuse("unsigned", f"image {args['version']} has no signature file; "
                                           "an unsigned image is flashed only by a technician "
                                           "at the CLI (--allow-unsigned)")
        self._sensor(args["sensor"])
        h = DeployHeader(deploy_id=args["deploy_id"], name=args["sensor"],
                         version=args["version"], sha256=args["sha256"], size=args["size"],
                         manifest_sha256=args["signature_sha256"],
                         manifest_size=args["signature_size"], chunk_size=args["chunk_size"],
                         gateway=args["gateway"])
        missing = self.chunks.begin(h)
        self._done.pop(h.deploy_id, None)  # a new transfer under an old id: a new result
        return {"deploy_id": h.deploy_id, "count": h.count, **_listed(missing),
                "state": "receiving"}

    def chunk(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            raw = base64.b64decode(args["data"], validate=True)
        except ValueError:
            raise DeployError(f"chunk {args['index']}: data is not standard base64") from None
        h = self.chunks.put(args["deploy_id"], args["index"], args["sha256"], raw)
        left = len(self.chunks.missing(args["deploy_id"], h))
        return {"deploy_id": args["deploy_id"], "index": args["index"], "stored": True,
                "left": left}

    async def commit(self, deploy_id: str) -> dict[str, Any]:
        h, image, signature = await asyncio.to_thread(self.chunks.assemble, deploy_id)
        sensor = self._sensor(h.name)
        try:
            header = check_image(image)
        except UpdateError as exc:
            self.chunks.drop(deploy_id)
            raise DeployError(f"not a firmware image: {exc}") from None
        if version_str(header.version) != h.version:
            self.chunks.drop(deploy_id)
            raise self._refuse("mismatch", f"the image is version "
                                           f"{version_str(header.version)}, sent as {h.version}")
        shared = self._shared()
        hub = running_hub(shared, str(sensor.port)) if shared is not None else None
        if hub is None:
            raise DeployError(f"sensor {sensor.name!r} is not running; its image is kept, "
                              "commit again once it is")
        try:
            client = await hub.acquire()
        except (DriverError, OSError) as exc:
            raise DeployError(f"sensor {sensor.name!r}: its device cannot be reached ({exc}); "
                              "the image is kept, commit again") from None
        hello = client.hello
        assert hello is not None  # acquire() returns a client after its handshake
        board = sensor.options.get("board")
        policy = FlashPolicy(TrustedKeys(self.cfg.commands.trusted()),
                             board if isinstance(board, str) else None,
                             allow_unsigned=False,
                             floor=await asyncio.to_thread(self._floor, hello.uid))
        # Every check before FW_BEGIN: nothing of a refused image reaches the device.
        try:
            approval = approve(image, signature, policy, hello.firmware)
        except FirmwareRefused as exc:
            self.chunks.drop(deploy_id)  # it will never pass: do not keep it
            self._count(exc.reason)
            raise DeployError(str(exc)) from None
        was = version_str(hello.firmware)
        log.warning("firmware.flash: %s (signed by %s) to %s, which runs %s", h.version,
                    approval.signed_by, sensor.name, was)
        try:
            result = await update.flash(client, image)
        except (LinkDown, RequestTimeout) as exc:
            self.last[sensor.name] = f"{h.version} interrupted"
            raise DeployError(f"interrupted: {exc}; commit again to resume from the offset "
                              "the device holds") from None
        except DriverError as exc:  # refused by the device, or it did not boot the image
            self.chunks.drop(deploy_id)
            self.last[sensor.name] = f"{h.version} failed: {str(exc)[:120]}"
            raise DeployError(f"flash failed: {exc}") from None
        floor_recorded = True
        try:
            await asyncio.to_thread(self.state.raise_floor, hello.uid, result.version)
        except (OSError, UpdateError) as exc:  # flashed all the same: say so, do not hide it
            floor_recorded = False
            log.error("firmware.flash: the anti-rollback floor %s was not recorded: %s",
                      version_str(result.version), exc)
        self.chunks.drop(deploy_id)
        self.counts["flashed"] += 1
        now = version_str(result.version)
        self.last[sensor.name] = f"flashed {now} (was {was})"
        log.info("firmware.flash: %s runs %s", sensor.name, now)
        return {"deploy_id": deploy_id, "sensor": sensor.name, "state": "flashed",
                "version": now, "previous": was, "signed_by": approval.signed_by,
                "board": approval.board, "bytes_sent": result.bytes_sent,
                "resumed_from": result.resumed_from, "floor_recorded": floor_recorded}

    def _floor(self, uid: bytes) -> Version3 | None:
        try:
            return self.state.floor(uid)
        except (OSError, UpdateError) as exc:
            # Without the floor a downgrade cannot be ruled out: nothing is flashed.
            raise DeployError(f"the anti-rollback floor cannot be read: {exc}") from None

    def status(self) -> dict[str, Any]:
        return {**self.counts, "refused": dict(self.refused), "last": dict(self.last),
                **self.chunks.status()}


_REASONS: Final[dict[str, Reason]] = {r: r for r in get_args(Reason)}


def _listed(missing: list[int]) -> dict[str, Any]:
    return {"missing": missing[:MISSING_LISTED], "missing_count": len(missing)}
