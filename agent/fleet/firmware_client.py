"""The cloud side of ``firmware.flash``: send an image and its signature file, resume, commit.

The image is signed beforehand (`firmware pack --sign`): the gateway checks that signature,
so this side only moves bytes. Every step can be repeated (a chunk stored twice is kept once),
so calling ``flash_firmware`` again after an interruption resumes where the gateway stands.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Final

from agent.fleet.deploy_client import Commander
from agent.fleet.model_args import MAX_CHUNK

COMMAND: Final = "firmware.flash"
ROUNDS: Final = 5  # of sending what the gateway lists as missing, before giving up


def begin_args(image: bytes, signature: bytes | None, *, sensor: str, version: str,
               deploy_id: str, target: str = "*", chunk_size: int = MAX_CHUNK) -> dict[str, Any]:
    """The ``begin`` step (``signature`` None: an unsigned image, which a gateway refuses)."""
    return {"op": "begin", "deploy_id": deploy_id, "sensor": sensor, "version": version,
            "sha256": hashlib.sha256(image).hexdigest(), "size": len(image),
            "signature_sha256": hashlib.sha256(signature).hexdigest() if signature else None,
            "signature_size": len(signature) if signature else None,
            "chunk_size": chunk_size, "gateway": target}


async def flash_firmware(commander: Commander, gateway: str, image: bytes,
                         signature: bytes | None, *, sensor: str, version: str,
                         deploy_id: str, target: str | None = None,
                         chunk_size: int = MAX_CHUNK, timeout_s: float = 15.0,
                         commit_timeout_s: float = 60.0) -> dict[str, Any]:
    """Flash ``image`` on ``sensor``'s device at ``gateway``; returns the last reply (the
    commit's when every step succeeded, otherwise the first that failed)."""
    reply = await commander.request(gateway, COMMAND, begin_args(
        image, signature, sensor=sensor, version=version, deploy_id=deploy_id,
        target=target or gateway, chunk_size=chunk_size), timeout_s)
    if reply.get("ok") is not True:
        return reply
    whole = image + (signature or b"")
    result = reply.get("result") or {}
    missing = result.get("missing") if isinstance(result, dict) else None
    for _ in range(ROUNDS):
        if not isinstance(missing, list) or not missing:
            break
        for i in missing:
            if not isinstance(i, int) or not 0 <= i * chunk_size < len(whole):
                raise ValueError(f"the gateway lists chunk {i!r}, which this image has not")
            data = whole[i * chunk_size:(i + 1) * chunk_size]
            reply = await commander.request(gateway, COMMAND, {
                "op": "chunk", "deploy_id": deploy_id, "index": i,
                "sha256": hashlib.sha256(data).hexdigest(),
                "data": base64.b64encode(data).decode()}, timeout_s)
            if reply.get("ok") is not True:
                return reply
        reply = await commander.request(gateway, COMMAND, {"op": "status",
                                                           "deploy_id": deploy_id}, timeout_s)
        if reply.get("ok") is not True:
            return reply
        result = reply.get("result") or {}
        missing = result.get("missing") if isinstance(result, dict) else None
    else:
        if missing:
            raise ValueError(f"chunks still missing after {ROUNDS} rounds: {missing[:5]}")
    for _ in range(ROUNDS):
        reply = await commander.request(gateway, COMMAND, {"op": "commit",
                                                           "deploy_id": deploy_id},
                                        commit_timeout_s)
        # A commit that outlasts the gateway's command timeout goes on there; asking again
        # waits for it, or gets its result.
        error = reply.get("error")
        if not isinstance(error, dict) or error.get("code") not in ("timeout", "busy"):
            break
    return reply
