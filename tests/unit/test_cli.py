"""The CLI without a kernel: help, lazy imports, exit codes, JSON, completion, man coverage."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from vhostctl.cli import app
from vhostctl.cli import commands as _commands  # noqa: F401  (registers every command)
from vhostctl.errors import IoctlError, UnsupportedError

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "man" / "vhostctl.8"


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _walk(cmd, path=()):
    """(command path, click command) for every command, groups included."""
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


def leaf_commands():
    return [(p, c) for p, c in _walk(typer.main.get_command(app)) if not hasattr(c, "commands")]


def _options(cmd) -> set[str]:
    out: set[str] = set()
    for p in cmd.params:
        if getattr(p, "param_type_name", "") == "option":
            out.update(p.opts)
            out.update(p.secondary_opts)
    return out


# -- help ------------------------------------------------------------------------------------


def test_leaf_commands_include_check_features_and_tap_group():
    paths = {" ".join(p) for p, _ in leaf_commands()}
    assert {"check", "features", "tap add", "tap del", "tap list", "tap show"} <= paths


@pytest.mark.parametrize("path", [" ".join(p) for p, _ in leaf_commands()])
def test_help_of_every_command_works(path):
    r = run(*path.split(), "--help")
    assert r.exit_code == 0, r.stdout
    assert "Usage:" in r.stdout


@pytest.mark.parametrize("path", ["check", "features", "tap add", "tap del", "tap list",
                                  "tap show"])
def test_help_texts_are_full_sentences(path):
    r = run(*path.split(), "--help")
    assert r.exit_code == 0, r.stdout
    assert "Usage:" in r.stdout
    cmd = dict((" ".join(p), c) for p, c in leaf_commands())[path]
    first = (cmd.help or "").strip().splitlines()[0]
    assert first[:1].isupper() and first.endswith("."), f"{path}: help {first!r}"
    for p in cmd.params:
        if getattr(p, "param_type_name", "") == "option" and p.help:
            assert p.help[:1].isupper() and p.help.rstrip().endswith("."), (path, p.opts, p.help)


def test_root_help_lists_commands_and_completion_options():
    r = run("--help")
    assert r.exit_code == 0
    for word in ("check", "features", "tap", "--install-completion", "--show-completion"):
        assert word in r.stdout


def test_help_does_not_import_pyroute2_or_the_library():
    code = (
        "import sys\n"
        "sys.argv = ['vhostctl', '--help']\n"
        "from vhostctl.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('pyroute2', 'vhostctl.netlink', 'vhostctl.taps',"
        " 'vhostctl.hostcheck') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert "Commands" in out
    assert "LOADED []" in out, out


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("vhostctl ")


def test_show_completion_prints_a_bash_script():
    env = dict(os.environ, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    r = subprocess.run([sys.executable, "-m", "vhostctl", "--show-completion", "bash"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert "complete" in r.stdout and "COMP_WORDS" in r.stdout


def test_completion_completes_tap_subcommands():
    env = dict(os.environ, _VHOSTCTL_COMPLETE="complete_bash", COMP_WORDS="vhostctl tap a",
               COMP_CWORD="2")
    code = "import sys; sys.argv[0] = 'vhostctl'; from vhostctl.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["add"]


# -- exit codes ------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (("tap", "add", "averyveryverylongname"), "IFNAMSIZ"),
    (("tap", "add", "vtx0", "--mac", "zz:00:00:00:00:01"), "six hex pairs"),
    (("tap", "add", "vtx0", "--mac", "01:00:5e:00:00:01"), "multicast"),
    (("tap", "add", "vtx0", "--offload", "csum,warp"), "unknown tun offload 'warp'"),
    (("tap", "add", "vtx0", "--offload", "tso4"), "needs csum"),
    (("tap", "add", "vtx0", "--owner", "no-such-user-here"), "no such user"),
    (("tap", "add", "vtx0", "--group", "no-such-group-here"), "no such group"),
    (("tap", "add", "vtx0", "--mtu", "67"), "68..65521"),
    (("tap", "add", "vtx0", "--bridge", "br0", "--netns", "x"), "exclude each other"),
    (("tap", "add", "vtx0", "--netns", "no-such-ns-here"), "does not exist"),
    (("tap", "show", "bad/name"), "tap name"),
    (("tap", "del", ""), "empty interface name"),
])
def test_validation_errors_exit_2_before_the_kernel(args, needle):
    r = run(*args)
    assert r.exit_code == 2, r
    assert r.stderr.startswith("vhostctl: ")
    assert needle in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [("tap", "add", "x", "--queues", "0"),
                                  ("tap", "add", "x", "--queues", "257"),
                                  ("tap", "add"), ("nosuchcommand",),
                                  ("tap", "add", "x", "--bogus")])
def test_usage_errors_exit_2(args):
    assert run(*args).exit_code == 2


@pytest.mark.parametrize("exc, code", [
    (IoctlError("TUNSETIFF", errno.EPERM), 3),
    (IoctlError("TUNSETIFF", errno.EACCES), 3),
    (UnsupportedError("TUNSETOFFLOAD", "no"), 4),
    (IoctlError("TUNSETIFF", errno.EBUSY), 1),
    (KeyboardInterrupt(), 130),
    (RuntimeError("bug"), 1),
])
def test_library_errors_map_to_exit_codes(monkeypatch, exc, code):
    import vhostctl.taps

    def boom(name, *a, **kw):
        raise exc

    monkeypatch.setattr(vhostctl.taps, "delete", boom)
    r = run("tap", "del", "vt0")
    assert r.exit_code == code
    if code != 130:
        assert r.stderr.startswith("vhostctl: ") and "Traceback" not in r.stderr


# -- JSON ------------------------------------------------------------------------------------


def test_check_json_parses_and_exit_code_follows_ready():
    r = run("check", "--json")
    data = json.loads(r.stdout)
    assert r.exit_code == (0 if data["ready"] else 1)
    names = [c["name"] for c in data["checks"]]
    for n in ("vhost-net device", "tun device", "vhost features", "CAP_NET_ADMIN",
              "vhost workers"):
        assert n in names
    for c in data["checks"]:
        assert set(c) == {"name", "ok", "detail", "fix", "data"}
        assert c["ok"] in (True, False, None)
        if c["ok"] is False:
            assert c["fix"], c


def test_features_json_and_text(monkeypatch):
    import vhostctl.hostcheck

    fake = {"vhost": {"value": "0x1", "names": ["VIRTIO_NET_F_CSUM"]},
            "vhost_backend": None,
            "tun": {"value": "0x2", "names": ["IFF_TAP"]},
            "tun_offloads": [{"name": "TUN_F_CSUM", "value": "0x1"}]}
    monkeypatch.setattr(vhostctl.hostcheck, "offered", lambda: fake)
    r = run("features", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == fake
    r = run("features")
    assert r.exit_code == 0
    assert "VIRTIO_NET_F_CSUM" in r.stdout and "not offered" in r.stdout
    assert "TUN_F_CSUM" in r.stdout


def test_tap_list_json_parses():
    r = run("tap", "list", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data["taps"], list) and isinstance(data["unreadable_processes"], int)


def test_tap_del_refuses_loopback_with_exit_2():
    r = run("tap", "del", "lo")
    assert r.exit_code == 2
    assert "not a tun/tap" in r.stderr


# -- man page --------------------------------------------------------------------------------


def _man_text() -> str:
    text = MAN.read_text()
    text = re.sub(r"\\f[BIRP]", "", text)
    return text.replace("\\-", "-").replace('"', "")


def _man_sections() -> dict[str, str]:
    """Text of each ``.SS vhostctl ...`` section, keyed by its heading."""
    out: dict[str, str] = {}
    current = None
    for line in _man_text().splitlines():
        if line.startswith((".SS", ".SH")):
            heading = line[3:].strip()
            current = heading if heading.startswith("vhostctl ") else None
            if current:
                out[current] = ""
        elif current:
            out[current] += line + "\n"
    return out


def _section_for(path: tuple[str, ...], sections: dict[str, str]) -> str | None:
    want = "vhostctl " + " ".join(path)
    for heading, body in sections.items():
        if heading == want or heading.startswith(want + " "):
            return body
    return None


@pytest.mark.parametrize("path", [" ".join(p) for p, _ in leaf_commands()])
def test_every_command_and_option_is_in_the_man_page(path):
    sections = _man_sections()
    body = _section_for(tuple(path.split()), sections)
    assert body is not None, f"man/vhostctl.8 has no '.SS vhostctl {path} ...' section"
    cmd = dict((" ".join(p), c) for p, c in leaf_commands())[path]
    helps = {"-h", "--help"}
    missing = [o for o in sorted(_options(cmd) - helps)
               if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", body)]
    assert not missing, f"options of 'vhostctl {path}' missing from its man section: {missing}"


def test_global_options_are_in_the_man_page():
    root = typer.main.get_command(app)
    text = _man_text()
    options = text[text.index(".SH OPTIONS"):text.index(".SH COMMANDS")]
    for opt in sorted(_options(root) | {"-h", "--help"}):
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", options), opt


def test_man_page_has_the_required_sections():
    text = MAN.read_text()
    for sec in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "JSON OUTPUT",
                "FILES", "EXAMPLES", "SEE ALSO"):
        assert re.search(rf"^\.SH \"?{sec}\"?$", text, re.M), sec
    assert text.count(".TS") == text.count(".TE") >= 4
    for code in ("0", "1", "2", "3", "4", "130"):
        assert re.search(rf"^\.B {code}$", text, re.M), f"exit status {code}"


def test_man_page_is_installed_as_data_file():
    py = (REPO / "pyproject.toml").read_text()
    assert '"share/man/man8" = ["man/vhostctl.8"]' in py
