"""The systemd unit and `install-service` / `uninstall-service` against a staging tree."""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.cli import service as cli_service
from agent.cli.service import Host, Options, load_templates, plan_install, render_unit
from agent.config.load import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "systemd"
EXEC = "/opt/edge-agent/bin/edge-agent"
MAX_EXPOSURE = 2.5


def unit_settings(text: str) -> dict[str, list[str]]:
    """Unit file keys to their values in order (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def templated_unit(tmp_path: Path, exec_path: str = "/bin/true") -> Path:
    unit = tmp_path / "edge-agent.service"
    unit.write_text(render_unit((TEMPLATES / "edge-agent.service").read_text(), exec_path))
    return unit


def sh(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, check=False, capture_output=True, text=True,
                          timeout=60)


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edge-agent")
    cli_service.register(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    rc: int = args.func(args)
    return rc


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under root: kind and permission bits."""
    out = {}
    for p in sorted(root.rglob("*")):
        kind = "dir" if p.is_dir() else "file"
        out[str(p.relative_to(root))] = (kind, p.stat().st_mode & 0o7777)
    return out


def stamps(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def passwd_digest() -> str:
    return hashlib.sha256(Path("/etc/passwd").read_bytes()
                          + Path("/etc/group").read_bytes()).hexdigest()


# -- the unit -------------------------------------------------------------------------------

def test_unit_has_the_service_contract_and_hardening() -> None:
    s = unit_settings((TEMPLATES / "edge-agent.service").read_text())
    expect = {
        "Type": "notify", "Restart": "on-failure", "ExecReload": "/bin/kill -HUP $MAINPID",
        "ExecStart": "/usr/local/bin/edge-agent run -c /etc/edge-agent/agent.toml",
        "User": "edge-agent", "SupplementaryGroups": "i2c dialout gpio",
        "StateDirectory": "edge-agent", "RuntimeDirectory": "edge-agent",
        "ConfigurationDirectory": "edge-agent", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "DevicePolicy": "closed", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "UMask": "0027", "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
        "AmbientCapabilities": "", "MemoryDenyWriteExecute": "yes",
    }
    for key, value in expect.items():
        assert s.get(key) == [value], (key, s.get(key))
    assert s["SystemCallFilter"][0] == "@system-service"
    assert re.fullmatch(r"\d+s", s["WatchdogSec"][0])
    assert re.fullmatch(r"\d+M", s["MemoryMax"][0])
    assert {"char-i2c rw", "char-ttyUSB rw", "char-ttyACM rw", "char-ttyAMA rw",
            "char-ttyS rw"} <= set(s["DeviceAllow"])
    assert s["LoadCredential"] == ["mqtt:/etc/edge-agent/credentials"]
    assert "IPAddressDeny" not in s and "IPAddressAllow" not in s


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = templated_unit(tmp_path)
    proc = sh(["systemd-analyze", "verify", str(unit)])
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "edge-agent" in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


def test_systemd_security_exposure_is_low(tmp_path: Path, capsys) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = templated_unit(tmp_path)
    proc = sh(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)])
    m = re.search(r"Overall exposure level for edge-agent\.service:\s*([0-9.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    score = float(m.group(1))
    with capsys.disabled():
        print(f"\nsystemd-analyze security exposure of edge-agent.service: {score} "
              f"(limit {MAX_EXPOSURE})")
    assert score <= MAX_EXPOSURE, proc.stdout


def test_default_config_is_valid_and_so_are_its_examples() -> None:
    text = (TEMPLATES / "agent.toml").read_text()
    cfg = load_config(TEMPLATES / "agent.toml")
    assert cfg.control.socket == "/run/edge-agent/control.sock"
    assert cfg.outbox.path.startswith("/var/lib/edge-agent/")
    examples = text[text.index("# [[sensors]]"):text.index("\n[mqtt]\n")]
    uncommented = text.replace(examples, re.sub(r"(?m)^# ?", "", examples))
    import tomllib

    cfg = parse_config(tomllib.loads(uncommented), "agent.toml with its examples")
    assert [s.name for s in cfg.sensors] == ["cabinet", "radar"]


def test_sysusers_file_creates_the_account(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    proc = sh(["systemd-sysusers", f"--root={tmp_path}", "-"],
              stdin=(TEMPLATES / "edge-agent.sysusers").read_text())
    assert proc.returncode == 0, proc.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    assert re.search(r"^edge-agent:x:\d+:\d+:[^:]*:/var/lib/edge-agent:/usr/sbin/nologin$",
                     passwd, re.MULTILINE), passwd
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert {"edge-agent", "i2c", "gpio", "dialout"} <= groups


# -- install-service ------------------------------------------------------------------------

EXPECTED_TREE = {
    "etc": ("dir", 0o755),
    "etc/edge-agent": ("dir", 0o755),
    "etc/edge-agent/agent.toml": ("file", 0o644),
    "etc/edge-agent/credentials": ("dir", 0o700),
    "etc/hostname": ("file", 0o644),
    "etc/sysusers.d": ("dir", 0o755),
    "etc/sysusers.d/edge-agent.conf": ("file", 0o644),
    "etc/systemd": ("dir", 0o755),
    "etc/systemd/system": ("dir", 0o755),
    "etc/systemd/system/edge-agent.service": ("file", 0o644),
}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc").chmod(0o755)
    (root / "etc/hostname").write_text("cabinet-17\n")
    (root / "etc/hostname").chmod(0o644)
    return root


def install(root: Path, *extra: str) -> int:
    return run(["install-service", "--root", str(root), "--exec", EXEC, *extra])


def test_dry_run_prints_the_plan_and_writes_nothing(image: Path, capsys) -> None:
    before = tree(image)
    assert install(image, "--dry-run") == 0
    out = capsys.readouterr().out
    assert tree(image) == before
    for rel in ("etc/systemd/system/edge-agent.service", "etc/edge-agent/agent.toml",
                "etc/sysusers.d/edge-agent.conf"):
        assert re.search(rf"^would write\s+{re.escape(str(image / rel))}", out, re.MULTILINE)
    assert "would create dir" in out and str(image / "etc/edge-agent/credentials") in out
    assert "not now      user edge-agent" in out
    assert "systemctl enable --now edge-agent.service  not run with --root" in out
    assert 'SYMLINK+="edge/radar"' in out, "the udev hint is printed"


def test_install_writes_the_tree_and_touches_no_real_account(image: Path, capsys) -> None:
    accounts = passwd_digest()
    assert install(image) == 0
    assert passwd_digest() == accounts, "--root must not create users on this machine"
    assert tree(image) == EXPECTED_TREE
    unit = (image / "etc/systemd/system/edge-agent.service").read_text()
    assert f"ExecStart={EXEC} run -c /etc/edge-agent/agent.toml" in unit.splitlines()
    cfg = load_config(image / "etc/edge-agent/agent.toml")
    assert cfg.gateway.id == "cabinet-17"
    assert (image / "etc/sysusers.d/edge-agent.conf").read_text() == \
        (TEMPLATES / "edge-agent.sysusers").read_text()
    out = capsys.readouterr().out
    assert f"{EXEC} does not exist under {image}" in out


def test_second_install_changes_nothing_and_keeps_an_edited_config(image: Path, capsys) -> None:
    assert install(image) == 0
    config = image / "etc/edge-agent/agent.toml"
    config.write_text(config.read_text().replace('host = "127.0.0.1"', 'host = "::1"'))
    before = stamps(image)
    capsys.readouterr()
    assert install(image) == 0
    out = capsys.readouterr().out
    assert stamps(image) == before
    assert "nothing to change" in out
    assert re.search(rf"^keep\s+{re.escape(str(config))}", out, re.MULTILINE)
    assert 'host = "::1"' in config.read_text()
    plan = plan_install(Options(root=image, exec_path=EXEC), load_templates(TEMPLATES), Host())
    assert [a for a in plan if a.changes] == []


def test_install_repairs_what_drifted(image: Path, capsys) -> None:
    assert install(image) == 0
    unit = image / "etc/systemd/system/edge-agent.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=no"))
    (image / "etc/edge-agent/credentials").chmod(0o755)
    capsys.readouterr()
    assert install(image) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^write\s+{re.escape(str(unit))}", out, re.MULTILINE)
    assert "ProtectSystem=strict" in unit.read_text()
    assert tree(image) == EXPECTED_TREE


def test_install_without_a_hostname_uses_the_template_id(tmp_path: Path) -> None:
    assert install(tmp_path) == 0
    assert load_config(tmp_path / "etc/edge-agent/agent.toml").gateway.id == "gateway-1"
    assert install(tmp_path / "other", "--gateway-id", "north-7") == 0
    assert load_config(tmp_path / "other/etc/edge-agent/agent.toml").gateway.id == "north-7"


@pytest.mark.parametrize(("argv", "needle"), [
    (["--gateway-id", "bad id!"], "--gateway-id 'bad id!'"),
    (["--exec", "relative/edge-agent"], "absolute path"),
    (["--exec", "/opt/my agent/edge-agent"], "without spaces"),
])
def test_bad_install_options_are_refused(tmp_path: Path, capsys, argv, needle) -> None:
    assert run(["install-service", "--root", str(tmp_path), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_live_install_refuses_an_agent_the_unit_could_not_see(capsys) -> None:
    assert run(["install-service", "--dry-run", "--exec", "/home/pi/venv/bin/edge-agent"]) == 2
    assert "ProtectHome=yes" in capsys.readouterr().err


@pytest.mark.parametrize("exec_path", ["/tmp/venv/bin/edge-agent", "/var/tmp/ea/edge-agent",
                                       "/tmp"])
def test_an_agent_under_a_private_tmp_is_refused(tmp_path: Path, capsys, exec_path) -> None:
    assert run(["install-service", "--dry-run", "--exec", exec_path]) == 2
    assert "PrivateTmp=yes" in capsys.readouterr().err
    assert run(["install-service", "--root", str(tmp_path), "--exec", exec_path]) == 2
    assert "PrivateTmp=yes" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []



def test_uninstall_works_from_an_agent_under_tmp(tmp_path: Path, monkeypatch) -> None:
    # Uninstalling starts no program: it works wherever the running edge-agent lives (here
    # as if run from a checkout under /tmp).
    import agent.cli.service as service

    monkeypatch.setattr(service, "default_exec", lambda: "/tmp/checkout/.venv/bin/edge-agent")
    assert run(["install-service", "--root", str(tmp_path), "--dry-run"]) == 2
    assert run(["uninstall-service", "--root", str(tmp_path)]) == 0



class KnownHost(Host):
    """A machine described by data: which accounts exist and the unit's state."""

    def __init__(self, groups: set[str], users: set[str], enabled: bool, active: bool) -> None:
        self.groups, self.users, self.state = groups, users, (enabled, active)

    def group_exists(self, name: str) -> bool:
        return name in self.groups

    def user_exists(self, name: str) -> bool:
        return name in self.users

    def unit_state(self) -> tuple[bool, bool]:
        return self.state


def test_live_plan_creates_missing_accounts_and_starts_the_service() -> None:
    host = KnownHost({"dialout"}, set(), enabled=False, active=False)
    plan = plan_install(Options(exec_path=EXEC), load_templates(TEMPLATES), host)
    argvs = [a.argv for a in plan if a.argv]
    assert ("groupadd", "--system", "edge-agent") in argvs
    assert ("groupadd", "--system", "i2c") in argvs and ("groupadd", "--system", "gpio") in argvs
    assert not any(a[-1] == "dialout" for a in argvs), "an existing group is left alone"
    useradd = next(a for a in argvs if a[0] == "useradd")
    assert useradd[:2] == ("useradd", "--system") and useradd[-1] == "edge-agent"
    assert "/usr/sbin/nologin" in useradd and "--no-create-home" in useradd
    assert argvs[-2:] == [("systemctl", "daemon-reload"),
                          ("systemctl", "enable", "--now", "edge-agent.service")]


def test_live_plan_for_a_running_service_restarts_it_only_when_the_unit_changes() -> None:
    host = KnownHost({"edge-agent", "i2c", "dialout", "gpio"}, {"edge-agent"},
                     enabled=True, active=True)
    plan = plan_install(Options(exec_path=EXEC), load_templates(TEMPLATES), host)
    argvs = [a.argv for a in plan if a.argv]
    if not Path("/etc/systemd/system/edge-agent.service").exists():
        assert ("systemctl", "try-restart", "edge-agent.service") in argvs
    assert not any(a[0] in ("groupadd", "useradd") for a in argvs)
    assert ("systemctl", "enable", "--now", "edge-agent.service") not in argvs


# -- uninstall-service ----------------------------------------------------------------------

def test_uninstall_keeps_config_and_data_unless_purged(image: Path, capsys) -> None:
    assert install(image) == 0
    data = image / "var/lib/edge-agent/outbox.db"
    data.parent.mkdir(parents=True)
    data.write_bytes(b"accepted rows")
    assert run(["uninstall-service", "--root", str(image)]) == 0
    assert not (image / "etc/systemd/system/edge-agent.service").exists()
    assert not (image / "etc/sysusers.d/edge-agent.conf").exists()
    assert (image / "etc/edge-agent/agent.toml").exists()
    assert data.read_bytes() == b"accepted rows"
    assert "--purge deletes it" in capsys.readouterr().out

    assert run(["uninstall-service", "--root", str(image)]) == 0
    assert "nothing to change" in capsys.readouterr().out

    assert run(["uninstall-service", "--root", str(image), "--dry-run", "--purge"]) == 0
    assert data.exists(), "--dry-run deletes nothing"
    assert run(["uninstall-service", "--root", str(image), "--purge"]) == 0
    assert not (image / "etc/edge-agent").exists()
    assert not (image / "var/lib/edge-agent").exists()
    assert (image / "etc/hostname").exists(), "only our files go"


def test_install_script_in_the_checkout_runs_the_same_code(image: Path) -> None:
    import sys

    script = str(TEMPLATES / "install.py")
    proc = sh([sys.executable, script, "--root", str(image), "--exec", EXEC, "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "would write" in proc.stdout and str(image) in proc.stdout
    proc = sh([sys.executable, script, "--uninstall", "--root", str(image), "--dry-run"])
    assert proc.returncode == 0 and "not installed" in proc.stdout, proc.stdout + proc.stderr
