"""Memory and start-up cost of the process, each figure beside a raw baseline from the same run.

    python bench/memory.py [--repeat 5]

- RSS by component: a bare interpreter, then what each import and the two shipped sessions add
  (each row is its own fresh child, so nothing is shared between rows): the package's numpy
  executor (what ``runtime = "auto"`` runs them in), and onnxruntime with its default session
  options and with its memory arena and pattern planner off, after 100 runs of each model on
  its manifest's fill values. Baselines: ``import numpy`` and ``import onnxruntime, numpy`` in
  a bare interpreter.
- RSS of the agent itself 3 s after READY=1 with no model, with both shipped models (default
  runtime) and with both forced onto onnxruntime (a synthetic sensor per stream, a real
  mosquitto on loopback), beside the bare interpreter and the baselines above.
- The tree's bytecode is compiled first (``compileall``), as installing the package does: an
  interpreter that has to compile the agent's sources at every start (``PYTHONDONTWRITEBYTECODE``
  with no ``__pycache__``) holds about half a MiB more after READY, which no gateway pays.
- ``edge-agent --help`` and ``edge-agent status`` (no agent listening: exit 3) wall time, median
  of ``--repeat`` runs, beside ``python -c pass`` and beside the interpreter importing numpy and
  onnxruntime.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.procs import agent_config, agent_running, rss_kib, synthetic  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402

SETTLE_S = 3.0

_SESSIONS = """
import numpy as np
import onnxruntime as ort
from models.manifest import load_manifest, session_options, shipped_paths
keep = []
for name in ("traffic", "energy"):
    opts = session_options()
    if {arena_off!r}:
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
    onnx_path, man_path = shipped_paths(name)
    m = load_manifest(man_path)
    s = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    x = np.array([[i.fill for i in m.inputs]], dtype=np.float32)
    for _ in range(100):  # the arena grows on runs, not at load
        s.run(None, {{m.input_tensor: x}})
    keep.append(s)
"""

_EXECUTOR = """
import numpy as np
from models.manifest import load_manifest, shipped_paths
from models.numpy_exec import NumpySession
keep = []
for name in ("traffic", "energy"):
    onnx_path, man_path = shipped_paths(name)
    m = load_manifest(man_path)
    s = NumpySession.from_path(onnx_path)
    x = np.array([[i.fill for i in m.inputs]], dtype=np.float32)
    for _ in range(100):
        s.run(None, {m.input_tensor: x})
    keep.append(s)
"""

BASELINES: list[tuple[str, str]] = [
    ("baseline: import numpy", "import numpy"),
    ("baseline: import onnxruntime, numpy", "import onnxruntime, numpy"),
]
COMPONENTS: list[tuple[str, str]] = [
    ("bare interpreter", ""),
    ("+ agent.runtime (no model)", "import agent.runtime"),
    ("+ numpy", "import agent.runtime, numpy"),
    ("+ both numpy executor sessions, 100 runs each", "import agent.runtime\n" + _EXECUTOR),
    ("+ onnxruntime", "import agent.runtime, numpy, onnxruntime"),
    ("+ both onnxruntime sessions, 100 runs each, default options",
     "import agent.runtime\n" + _SESSIONS.format(arena_off=False)),
    ("+ both onnxruntime sessions, 100 runs each, arena and pattern off",
     "import agent.runtime\n" + _SESSIONS.format(arena_off=True)),
]

# What each row adds to: the row it builds on.
BASE_OF = {label: base for label, base in (
    ("+ agent.runtime (no model)", "bare interpreter"),
    ("+ numpy", "+ agent.runtime (no model)"),
    ("+ both numpy executor sessions, 100 runs each", "+ numpy"),
    ("+ onnxruntime", "+ numpy"),
    ("+ both onnxruntime sessions, 100 runs each, default options", "+ onnxruntime"),
    ("+ both onnxruntime sessions, 100 runs each, arena and pattern off", "+ onnxruntime"))}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def child_rss_mib(code: str) -> float:
    """VmRSS of a fresh interpreter after running ``code``, as it reports it itself."""
    program = (f"{code}\nfor ln in open('/proc/self/status'):\n"
               "    if ln.startswith('VmRSS:'):\n        print(int(ln.split()[1]))\n")
    out = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=_env(), check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return int(out.split()[-1]) / 1024


def wall_s(argv: list[str], repeat: int) -> float:
    """Median wall time of a command, start to exit (its exit code is not judged)."""
    times = []
    for _ in range(repeat):
        t0 = time.monotonic()
        subprocess.run(argv, cwd=ROOT, env=_env(), check=False, capture_output=True, timeout=120)
        times.append(time.monotonic() - t0)
    return sorted(times)[len(times) // 2]


def agent_rss_mib(tmp: Path, port: int, runtime: str | None) -> tuple[float, float]:
    """(RSS 3 s after READY, seconds to READY) of ``edge-agent run``."""
    sensors = [synthetic("meter", 1.0, quantity="active_power", unit="W", base=500.0),
               synthetic("radar", 1.0, quantity="speed_in", unit="m/s", base=12.0)]
    streams = [{"name": "energy", "sensors": ["meter"], "window_s": 10},
               {"name": "traffic", "sensors": ["radar"], "window_s": 10}]
    models = ([{"name": n, "stream": n, "runtime": runtime} for n in ("traffic", "energy")]
              if runtime is not None else [])
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = agent_config(tmp, port, sensors=sensors, streams=streams, models=models)
    with agent_running(cfg, tmp / "agent.log") as a:
        time.sleep(SETTLE_S)  # a measurement interval, not a synchronisation
        return rss_kib(a.pid) / 1024, a.ready_s


def measure(repeat: int) -> dict[str, Any]:
    for package in ("agent", "drivers", "models"):
        compileall.compile_dir(ROOT / package, quiet=1)
    out: dict[str, Any] = {"components_mib": {}, "baselines_mib": {}, "agent": {}, "cli_s": {}}
    for label, code in COMPONENTS:
        out["components_mib"][label] = round(child_rss_mib(code), 1)
    for label, code in BASELINES:
        out["baselines_mib"][label] = round(child_rss_mib(code), 1)
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as d:
        tmp = Path(d)
        broker = Mosquitto(tmp / "mosq")
        broker.start()
        try:
            for key, runtime in (("no_models", None), ("both_models", "auto"),
                                 ("both_models_onnxruntime", "onnxruntime")):
                rss, ready = agent_rss_mib(tmp / key, broker.port, runtime)
                out["agent"][key] = {"rss_mib": round(rss, 1), "ready_s": round(ready, 2)}
        finally:
            broker.stop()
        sock = str(tmp / "none.sock")
        py = sys.executable
        out["cli_s"] = {
            "python -c pass": wall_s([py, "-c", "pass"], repeat),
            "python -c 'import numpy, onnxruntime'": wall_s(
                [py, "-c", "import numpy, onnxruntime"], repeat),
            "edge-agent --help": wall_s([py, "-m", "agent.cli.main", "--help"], repeat),
            "edge-agent status": wall_s([py, "-m", "agent.cli.main", "status", "--socket", sock],
                                        repeat),
        }
    return out


def report(r: dict[str, Any]) -> str:
    comp = r["components_mib"]
    bare = comp["bare interpreter"]
    lines = ["RSS by component (each a fresh interpreter; MiB, and what it adds to the row it "
             "builds on)"]
    for label, mib in comp.items():
        base = comp[BASE_OF.get(label, "bare interpreter")]
        lines.append(f"  {label:66s} {mib:6.1f}  (+{mib - base:5.1f})")
    for label, mib in r["baselines_mib"].items():
        lines.append(f"  {label:66s} {mib:6.1f}  (+{mib - bare:5.1f} over bare)")
    both = r["baselines_mib"]["baseline: import onnxruntime, numpy"]
    lines.append(f"agent RSS {SETTLE_S:.0f} s after READY (bare interpreter {bare:.1f} MiB, "
                 f"import onnxruntime, numpy {both:.1f} MiB)")
    for key, row in r["agent"].items():
        lines.append(f"  {key:24s} {row['rss_mib']:6.1f} MiB  = {row['rss_mib'] / bare:4.1f} x "
                     f"bare, {row['rss_mib'] / both:4.2f} x import onnxruntime, numpy  "
                     f"(READY after {row['ready_s']:.2f} s)")
    cli = r["cli_s"]
    base = cli["python -c pass"]
    lines.append("CLI wall time, median (s)")
    for label, s in cli.items():
        lines.append(f"  {label:40s} {s:6.3f}  = {s / base:4.1f} x python -c pass")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = measure(args.repeat)
    print(json.dumps(r, indent=2) if args.json else report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
