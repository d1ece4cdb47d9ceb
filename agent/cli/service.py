"""``edge-agent install-service`` / ``uninstall-service``: the agent as a hardened systemd unit.

An install is a plan, a list of ``Action``s computed from what is already on the machine, and
then the plan carried out: ``--dry-run`` prints the plan, tests inspect it, and a second run
finds everything in place and changes nothing. Actions that are already satisfied stay in the
plan as ``ok`` or ``keep`` so the output shows the whole picture.

With ``--root DIR`` files go into a staging tree (an SD-card image being prepared): the real
system is not touched, accounts are created at the image's first boot by systemd-sysusers from
the installed sysusers.d file, and systemctl is not run.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent import jsontext
from agent.cli.completion import BASH_FILE, ZSH_FILE, script

SERVICE = "edge-agent.service"
USER = "edge-agent"
DEVICE_GROUPS = ("i2c", "dialout", "gpio")  # named by SupplementaryGroups= in the unit
DEFAULT_EXEC = "/usr/local/bin/edge-agent"
UNIT = "etc/systemd/system/edge-agent.service"
CONFIG_DIR = "etc/edge-agent"
CONFIG = "etc/edge-agent/agent.toml"
CREDENTIALS = "etc/edge-agent/credentials"
SYSUSERS = "etc/sysusers.d/edge-agent.conf"
STATE = "var/lib/edge-agent"
TEMPLATE_FILES = {"unit": "edge-agent.service", "config": "agent.toml",
                  "sysusers": "edge-agent.sysusers", "udev": "udev-serial.rules.example"}
GATEWAY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TEMPLATE_GATEWAY_LINE = re.compile(r'^id = "gateway-1"$', re.MULTILINE)
COMMAND_TIMEOUT_S = 120.0

Kind = Literal["create-group", "create-user", "delete-user", "delete-group", "mkdir", "chmod",
               "write", "remove", "remove-tree", "run", "ok", "keep", "defer", "hint"]
CHANGING = {"create-group", "create-user", "delete-user", "delete-group", "mkdir", "chmod",
            "write", "remove", "remove-tree", "run"}
VERBS = {"create-group": "create group", "create-user": "create user",
         "delete-user": "delete user", "delete-group": "delete group", "mkdir": "create dir",
         "chmod": "chmod", "write": "write", "remove": "remove", "remove-tree": "remove tree",
         "run": "run", "ok": "ok", "keep": "keep", "defer": "not now", "hint": "hint"}


class ServiceError(Exception):
    """An install or uninstall that cannot go on; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Action:
    kind: Kind
    target: str
    detail: str = ""
    content: bytes | None = field(default=None, repr=False, compare=False)
    mode: int | None = None
    argv: tuple[str, ...] = ()

    @property
    def changes(self) -> bool:
        return self.kind in CHANGING

    def describe(self) -> str:
        what = " ".join(self.argv) if self.kind == "run" else self.target
        mode = f" (mode {self.mode:04o})" if self.mode is not None and self.changes else ""
        extra = f"  {self.detail}" if self.detail else ""
        return f"{VERBS[self.kind]:<12} {what}{mode}{extra}"


@dataclass(frozen=True)
class Templates:
    unit: str
    config: str
    sysusers: str
    udev: str


def find_templates(explicit: str | None = None) -> Path:
    """The directory of the unit and config templates: a checkout's ``systemd/`` or the
    copy installed under ``{prefix}/share/edge-agent/systemd``."""
    here = Path(__file__).resolve().parents[2] / "systemd"
    shared = Path(sys.prefix) / "share" / "edge-agent" / "systemd"
    candidates = [Path(explicit)] if explicit else [here, shared]
    for d in candidates:
        if (d / TEMPLATE_FILES["unit"]).is_file():
            return d
    raise ServiceError("service templates not found in " + ", ".join(map(str, candidates)))


def load_templates(directory: Path) -> Templates:
    try:
        return Templates(**{k: (directory / name).read_text(encoding="utf-8")
                            for k, name in TEMPLATE_FILES.items()})
    except OSError as exc:
        raise ServiceError(f"cannot read service template: {exc}") from exc


def render_unit(template: str, exec_path: str) -> str:
    if not exec_path.startswith("/") or re.search(r"\s|[\"'\\%$]", exec_path):
        raise ServiceError(f"--exec {exec_path!r}: need an absolute path without spaces, "
                           "quotes, '%' or '$'")
    prefix = f"ExecStart={DEFAULT_EXEC} "
    if template.count(prefix) != 1:
        raise ServiceError(f"unit template has no single line starting with {prefix!r}")
    return template.replace(prefix, f"ExecStart={exec_path} ")


def render_config(template: str, gateway_id: str) -> str:
    return TEMPLATE_GATEWAY_LINE.sub(f'id = "{gateway_id}"', template, count=1)


def default_gateway_id(root: Path) -> str:
    """The target's host name when it is a valid gateway id, else the template's."""
    try:
        name = (root / "etc/hostname").read_text().strip() if root != Path("/") \
            else socket.gethostname()
    except OSError:
        name = ""
    name = name.split(".")[0]
    return name if GATEWAY_ID.match(name) else "gateway-1"


def default_exec() -> str:
    argv0 = Path(sys.argv[0])
    if argv0.name == "edge-agent" and argv0.is_absolute():
        return str(argv0)
    found = shutil.which("edge-agent")
    if found:
        return str(Path(found).absolute())
    beside = Path(sys.executable).parent / "edge-agent"
    return str(beside) if beside.exists() else DEFAULT_EXEC


# -- the machine, as the planner sees it ------------------------------------------------------

class Host:
    """Accounts and unit state of the running system; the seam tests replace with data."""

    def group_exists(self, name: str) -> bool:
        try:
            grp.getgrnam(name)
        except KeyError:
            return False
        return True

    def user_exists(self, name: str) -> bool:
        try:
            pwd.getpwnam(name)
        except KeyError:
            return False
        return True

    def unit_state(self) -> tuple[bool, bool]:
        """(enabled, active); both False when systemctl cannot tell."""
        def query(verb: str) -> bool:
            try:
                return subprocess.run(["systemctl", verb, "--quiet", SERVICE], check=False,
                                      timeout=COMMAND_TIMEOUT_S).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                return False
        return query("is-enabled"), query("is-active")


@dataclass(frozen=True)
class Options:
    root: Path = Path("/")
    exec_path: str = DEFAULT_EXEC
    gateway_id: str = "gateway-1"
    purge: bool = False

    @property
    def live(self) -> bool:
        return self.root == Path("/")

    def path(self, rel: str) -> Path:
        return self.root / rel


def _file(opts: Options, rel: str, content: str, mode: int, what: str) -> Action:
    path = opts.path(rel)
    data = content.encode()
    try:
        same = path.read_bytes() == data
    except OSError:
        same = False
    if same:
        if (path.stat().st_mode & 0o7777) != mode:
            return Action("chmod", str(path), what, mode=mode)
        return Action("ok", str(path), f"{what}, up to date")
    return Action("write", str(path), what, content=data, mode=mode)


def _dir(opts: Options, rel: str, mode: int, what: str) -> Action:
    path = opts.path(rel)
    if not path.is_dir():
        return Action("mkdir", str(path), what, mode=mode)
    if (path.stat().st_mode & 0o7777) != mode:
        return Action("chmod", str(path), what, mode=mode)
    return Action("ok", str(path), what)


def _accounts(opts: Options, host: Host) -> list[Action]:
    if not opts.live:
        return [Action("defer", f"user {USER}, groups {USER} {' '.join(DEVICE_GROUPS)}",
                       f"created at first boot by systemd-sysusers from /{SYSUSERS}")]
    out: list[Action] = []
    for g in (USER, *DEVICE_GROUPS):
        out.append(Action("ok", f"group {g}", "exists") if host.group_exists(g) else
                   Action("create-group", g, argv=("groupadd", "--system", g)))
    if host.user_exists(USER):
        out.append(Action("ok", f"user {USER}", "exists"))
    else:
        out.append(Action("create-user", USER, argv=(
            "useradd", "--system", "--gid", USER, "--home-dir", f"/{STATE}", "--no-create-home",
            "--shell", "/usr/sbin/nologin", "--comment", "edge-agent sensor gateway", USER)))
    return out


def plan_install(opts: Options, t: Templates, host: Host,
                 completions: Mapping[str, str] | None = None) -> list[Action]:
    """``completions``: shell completion scripts by the path they are installed at."""
    plan = _accounts(opts, host)
    plan.append(_file(opts, SYSUSERS, t.sysusers, 0o644, "service account (sysusers.d)"))
    plan.append(_dir(opts, CONFIG_DIR, 0o755, "configuration"))
    config = opts.path(CONFIG)
    if config.exists():
        plan.append(Action("keep", str(config), "exists; an installed config is never replaced"))
    else:
        plan.append(Action("write", str(config), f"default config, gateway {opts.gateway_id}",
                           content=render_config(t.config, opts.gateway_id).encode(),
                           mode=0o644))
    plan.append(_dir(opts, CREDENTIALS, 0o700, "secrets for LoadCredential= (root only)"))
    unit = _file(opts, UNIT, render_unit(t.unit, opts.exec_path), 0o644, "systemd unit")
    plan.append(unit)
    if not opts.live:
        plan.append(Action("defer", "systemctl daemon-reload; systemctl enable --now "
                           f"{SERVICE}", "not run with --root"))
        if not opts.path(opts.exec_path.lstrip("/")).exists():
            plan.append(Action("hint", f"{opts.exec_path} does not exist under {opts.root} yet; "
                               "install edge-agent there before the first boot"))
    else:
        enabled, active = host.unit_state()
        if unit.changes:
            plan.append(Action("run", SERVICE, argv=("systemctl", "daemon-reload")))
        if unit.changes and active:
            plan.append(Action("run", SERVICE, "the running agent picks up the new unit",
                               argv=("systemctl", "try-restart", SERVICE)))
        if enabled and active:
            plan.append(Action("ok", SERVICE, "enabled and running"))
        else:
            plan.append(Action("run", SERVICE, argv=("systemctl", "enable", "--now", SERVICE)))
    plan.extend(_file(opts, rel, text, 0o644, "shell completion")
                for rel, text in (completions or {}).items())
    plan.append(Action("hint", "stable serial names (udev)", t.udev))
    return plan


def plan_uninstall(opts: Options, host: Host) -> list[Action]:
    plan: list[Action] = []
    unit = opts.path(UNIT)
    if opts.live and unit.exists():
        plan.append(Action("run", SERVICE, argv=("systemctl", "disable", "--now", SERVICE)))
    elif not opts.live:
        plan.append(Action("defer", f"systemctl disable {SERVICE}", "not run with --root"))
    for rel in (UNIT, SYSUSERS, BASH_FILE, ZSH_FILE):
        path = opts.path(rel)
        plan.append(Action("remove", str(path)) if path.exists() or path.is_symlink()
                    else Action("ok", str(path), "not installed"))
    if opts.live and unit.exists():
        plan.append(Action("run", SERVICE, argv=("systemctl", "daemon-reload")))
    for rel, what in ((CONFIG_DIR, "configuration and credentials"), (STATE, "data")):
        path = opts.path(rel)
        if not path.exists():
            plan.append(Action("ok", str(path), f"{what}: none"))
        elif opts.purge:
            plan.append(Action("remove-tree", str(path), what))
        else:
            plan.append(Action("keep", str(path), f"{what} kept (--purge deletes it)"))
    if opts.purge and opts.live:
        if host.user_exists(USER):
            plan.append(Action("delete-user", USER, argv=("userdel", USER)))
        if host.group_exists(USER):
            plan.append(Action("delete-group", USER, argv=("groupdel", USER)))
    elif opts.purge:
        plan.append(Action("defer", f"user and group {USER}", "delete them in the image"))
    return plan


# -- carrying a plan out --------------------------------------------------------------------

Runner = Callable[[Sequence[str]], None]


def run_command(argv: Sequence[str]) -> None:
    try:
        proc = subprocess.run(list(argv), check=False, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"{' '.join(argv)}: {exc}", exit_code=1) from exc
    if proc.returncode != 0:
        raise ServiceError(f"{' '.join(argv)} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()}", exit_code=1)


def _already_done(a: Action, host: Host) -> bool:
    if a.kind in ("create-group", "delete-group"):
        return host.group_exists(a.target) == (a.kind == "create-group")
    if a.kind in ("create-user", "delete-user"):
        return host.user_exists(a.target) == (a.kind == "create-user")
    return False


def apply(plan: Sequence[Action], host: Host, runner: Runner = run_command,
          echo: Callable[[str], None] = print) -> None:
    """Carry the plan out in order, echoing each step as it is done."""
    for a in plan:
        if a.kind == "hint":
            continue
        if a.changes and not _already_done(a, host):
            _do(a, runner)
        echo(a.describe())
    print_hints(plan, echo)


def _do(a: Action, runner: Runner) -> None:
    if a.kind == "write" and a.content is not None:
        path = Path(a.target)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(a.content)
        os.chmod(tmp, a.mode if a.mode is not None else 0o644)
        os.replace(tmp, path)
    elif a.kind == "mkdir":
        Path(a.target).mkdir(parents=True, exist_ok=True)
        os.chmod(a.target, a.mode if a.mode is not None else 0o755)
    elif a.kind == "chmod" and a.mode is not None:
        os.chmod(a.target, a.mode)
    elif a.kind == "remove":
        Path(a.target).unlink(missing_ok=True)
    elif a.kind == "remove-tree":
        shutil.rmtree(a.target)
    elif a.argv:
        runner(a.argv)


def print_hints(plan: Sequence[Action], echo: Callable[[str], None] = print) -> None:
    for a in plan:
        if a.kind == "hint":
            echo(f"\n{a.target}:\n{a.detail.rstrip()}" if a.detail else f"\n{a.target}")


def print_plan(plan: Sequence[Action], echo: Callable[[str], None] = print) -> None:
    for a in plan:
        if a.kind != "hint":
            echo(("would " if a.changes else "") + a.describe())
    print_hints(plan, echo)


# -- commands -------------------------------------------------------------------------------

def _options(args: argparse.Namespace, *, installing: bool = True) -> Options:
    root = Path(args.root).resolve() if args.root else Path("/")
    exec_path = getattr(args, "exec_path", None) or default_exec()
    gateway = getattr(args, "gateway_id", None) or default_gateway_id(root)
    if not GATEWAY_ID.match(gateway):
        raise ServiceError(f"--gateway-id {gateway!r}: letters, digits, '_', '.', '-' only "
                           "(up to 64, starting with a letter or digit)")
    if installing:
        _check_exec(exec_path, root)
    return Options(root=root, exec_path=exec_path, gateway_id=gateway,
                   purge=getattr(args, "purge", False))


def _check_exec(exec_path: str, root: Path) -> None:
    """A program the hardened unit could not start is refused at install (an uninstall needs
    no program: it removes what is there wherever the agent was run from)."""
    if root == Path("/") and re.match(r"^/(home|root|run/user)(/|$)", exec_path):
        raise ServiceError(f"{exec_path} is under /home or /root, which the unit hides "
                           "(ProtectHome=yes): install edge-agent under /opt or /usr/local, or "
                           "pass --exec")
    # Wherever the unit is installed, its PrivateTmp=yes gives the service an empty /tmp and
    # /var/tmp: a program there (or linked from there) is not found when the service starts.
    real = os.path.realpath(exec_path) if root == Path("/") else exec_path
    if any(re.match(r"^/(var/)?tmp(/|$)", p) for p in (exec_path, real)):
        raise ServiceError(f"{exec_path} is under /tmp or /var/tmp, which the unit replaces "
                           "with an empty one of its own (PrivateTmp=yes): install edge-agent "
                           "under /opt or /usr/local, or pass --exec")


def _plan_json(plan: Sequence[Action]) -> list[dict[str, object]]:
    return [{"action": a.kind, "target": a.target, "detail": a.detail, "mode": a.mode,
             "argv": list(a.argv), "changes": a.changes} for a in plan]


def _execute(args: argparse.Namespace, make_plan: Callable[[Options, Host], list[Action]], *,
             installing: bool = True) -> int:
    def fail(message: str, code: int) -> int:
        if args.json:
            print(jsontext.dumps({"ok": False, "error": message}))
        print(f"{args.command}: {message}", file=sys.stderr)
        return code

    try:
        opts = _options(args, installing=installing)
        if opts.live and not args.dry_run and os.geteuid() != 0:
            return fail(f"changes the system: run it as root (sudo edge-agent {args.command})",
                        1)
        host = Host()
        plan = make_plan(opts, host)
        if args.dry_run:
            if args.json:
                print(jsontext.dumps({"ok": True, "dry_run": True, "plan": _plan_json(plan)},
                                     indent=2))
            else:
                print_plan(plan)
            return 0
        apply(plan, host, echo=(lambda line: None) if args.json else print)
        if args.json:
            print(jsontext.dumps({"ok": True, "dry_run": False, "plan": _plan_json(plan)},
                                 indent=2))
        elif not any(a.changes for a in plan):
            print("nothing to change")
    except ServiceError as exc:
        return fail(str(exc), exc.exit_code)
    except OSError as exc:
        return fail(str(exc), 1)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    def make(opts: Options, host: Host) -> list[Action]:
        # The completion scripts are made from the whole command tree, which the CLI builds.
        full = getattr(args, "full_parser", None)
        parser = full() if full is not None else None
        return plan_install(opts, load_templates(find_templates(args.templates)), host,
                            {rel: script(shell, parser)
                             for shell, rel in (("bash", BASH_FILE), ("zsh", ZSH_FILE))}
                            if parser is not None else None)
    return _execute(args, make)


def cmd_uninstall(args: argparse.Namespace) -> int:
    return _execute(args, plan_uninstall, installing=False)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", metavar="DIR",
                        help="work on the tree at DIR (an image being prepared), not this system")
    common.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    common.add_argument("--json", action="store_true",
                        help="print {ok, dry_run, plan: [{action, target, ...}]} as JSON")

    p = sub.add_parser("install-service", parents=[common],
                       help="install the hardened systemd unit, user and default config (root)")
    p.add_argument("--exec", dest="exec_path", metavar="PATH",
                   help="the edge-agent script ExecStart= runs (default: this one)")
    p.add_argument("--gateway-id", metavar="ID",
                   help="gateway id for a new config (default: the host name)")
    p.add_argument("--templates", metavar="DIR", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_install, command="install-service")

    p = sub.add_parser("uninstall-service", parents=[common],
                       help="remove the unit; keep config and data unless --purge (root)")
    p.add_argument("--purge", action="store_true",
                   help="also delete /etc/edge-agent, /var/lib/edge-agent and the user")
    p.set_defaults(func=cmd_uninstall, command="uninstall-service")
