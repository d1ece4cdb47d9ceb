"""Config sections of the optional services beside the pipeline: the local history, the status
page and metrics, and the Sparkplug B output."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.config.base import FilePath, _Frozen, is_loopback


class HistoryConfig(_Frozen):
    enabled: bool = True
    """Keep a local history of the models' 300 s windows and of the anomaly streams' circuits
    (`edge-agent model history export` writes them as the training and calibration CSVs, to
    calibrate the models and the anomaly thresholds to this site). Only when models or anomaly
    tables are configured."""
    path: Annotated[str, Field(max_length=4096)] = ""
    """SQLite file of the history; empty: `history.db` beside the outbox file."""
    retention_days: Annotated[float, Field(ge=1, le=400, allow_inf_nan=False)] = 60.0
    """Days of model windows kept (60 days of 300 s rows: about 1.5 MB)."""
    circuit_days: Annotated[float, Field(ge=1, le=120, allow_inf_nan=False)] = 30.0
    """Days of circuit windows kept for the streams with an `anomaly` table (their thresholds
    are calibrated from them; 30 days of 60 s windows: about 3 MB a stream)."""


class WebConfig(_Frozen):
    page: bool = False
    """Serve the read-only status page (`/`) with live updates."""
    metrics: bool = False
    """Serve Prometheus / OpenMetrics text on `/metrics` (on its own or beside the page)."""
    bind: Annotated[str, Field(min_length=1, max_length=253)] = "127.0.0.1"
    """Address to listen on. Anything but loopback needs `token_file`."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8470
    """TCP port of the page and `/metrics` (0: any free port, logged at start)."""
    token_file: FilePath = ""
    """File whose first line is the access token (HTTP Basic password or Bearer token);
    required for a non-loopback `bind`, optional on loopback."""
    max_clients: Annotated[int, Field(ge=1, le=64)] = 8
    """Connections served at once (live pages included); more are refused with 503."""

    @model_validator(mode="after")
    def _token_off_loopback(self) -> WebConfig:
        if (self.page or self.metrics) and not is_loopback(self.bind) and not self.token_file:
            raise ValueError(f"bind {self.bind!r} is not loopback: set web.token_file")
        return self

    def enabled(self) -> bool:
        return self.page or self.metrics


SparkplugId = Annotated[str, Field(pattern=r"^[^/+#\s]{1,64}$", max_length=64)]


class SparkplugConfig(_Frozen):
    enabled: bool = False
    """Publish every sensor as a Sparkplug B 3.0 device of this edge node (docs/sparkplug.md),
    on the `[mqtt]` broker, beside the agent's own feed."""
    group_id: SparkplugId = "edge"
    """Sparkplug group id: topics are `spBv1.0/{group_id}/...`."""
    node_id: SparkplugId | Literal[""] = ""
    """Edge node id; empty: the gateway id."""
    interval_s: Annotated[float, Field(ge=0.01, le=3600, allow_inf_nan=False)] = 1.0
    """Each device's readings are sent in one DDATA at most this often (every reading is in
    it, each with its own timestamp)."""
    backlog_max: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    """DDATA payloads stored while the broker is away (across restarts too), replayed as
    historical; the oldest are dropped (and counted) past it."""
    state_dir: FilePath = ""
    """Directory of `sparkplug.bdseq` (bdSeq across restarts) and `sparkplug-backlog.db`;
    empty: the outbox's directory."""
