"""exec hand-off: command checks, substitution, identities and fd inheritance (no kernel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vhostctl import handoff as ho
from vhostctl.errors import ValidationError

QEMU_NETDEV = "tap,id=n0,fds={tapfds},vhostfds={vhostfds},vhost=on"


def test_good_command_passes():
    ho.check_command(["qemu-system-x86_64", "-netdev", QEMU_NETDEV], 2)
    ho.check_command(["vmm", "--tap-fds", "{tapfds}", "--vhost-fds", "{vhostfds}"], 1)


@pytest.mark.parametrize("argv, queues, words", [
    ([], 1, "no command"),
    (["qemu", "-netdev", "tap,id=n0,fds={tapfds}"], 1, "{vhostfds} appears 0 times"),
    (["qemu", "{tapfds}", "{tapfds}", "{vhostfds}"], 1, "{tapfds} appears 2 times"),
    (["qemu", "-netdev", QEMU_NETDEV + ",script={tapfd}"], 1, "unknown placeholder {tapfd}"),
    (["qemu", "-netdev", QEMU_NETDEV + ",queues=4"], 2, "queues=4 but --queues is 2"),
    (["qemu", "-netdev", "tap,fd={tapfds},vhostfd={vhostfds}"], 2, "fd= takes one fd"),
    (["qemu", "-netdev", "tap,fds={tapfds},vhostfds={vhostfds},vhost=off"], 1, "vhost=off"),
    (["qemu", "-netdev", '{"type":"tap","fds":"{tapfds}","vhostfds":"{vhostfds}",'
      '"queues":3}'], 2, "queues=3"),
    (["qemu", "-netdev", QEMU_NETDEV], 0, "--queues"),
])
def test_bad_commands_are_refused(argv, queues, words):
    with pytest.raises(ValidationError) as ei:
        ho.check_command(argv, queues)
    assert words in str(ei.value) and ei.value.code == 2


def test_substitute_keyval_and_json():
    argv = ["qemu", "-netdev", QEMU_NETDEV,
            "-object", '{"qom-type":"x","id":"{tapfds}-{vhostfds}"}']
    out = ho.substitute(argv, [3, 4], [5, 6])
    assert out[2] == "tap,id=n0,fds=3:4,vhostfds=5:6,vhost=on"
    assert json.loads(out[4])["id"] == "3:4-5:6"
    assert argv[2] == QEMU_NETDEV  # the input is not modified


def test_identity_rules():
    with pytest.raises(ValidationError, match="needs --user"):
        ho.resolve_identity(None, "nogroup")
    with pytest.raises(ValidationError, match="is root"):
        ho.resolve_identity("root", None)
    with pytest.raises(ValidationError, match="no user"):
        ho.resolve_identity("no-such-user-vhostctl", None)
    assert ho.resolve_identity(None, None) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="resolving another user needs root")
def test_identity_of_nobody():
    import pwd

    pw = pwd.getpwnam("nobody")
    who = ho.resolve_identity("nobody", None)
    assert (who.uid, who.gid) == (pw.pw_uid, pw.pw_gid) and pw.pw_gid in who.groups
    assert ho.resolve_identity(str(pw.pw_uid), str(pw.pw_gid)).user == "nobody"
    with pytest.raises(ValidationError, match="no group"):
        ho.resolve_identity("nobody", "no-such-group-vhostctl")


def test_executable_must_exist():
    assert ho.resolve_executable("sh").startswith("/")
    with pytest.raises(ValidationError, match="not in PATH"):
        ho.resolve_executable("no-such-program-vhostctl")
    with pytest.raises(ValidationError, match="not executable"):
        ho.resolve_executable("/etc/passwd")


def test_capabilities_parse():
    caps = ho.capabilities("Name:\tx\nCapInh:\t0\nCapPrm:\t00000000000000ff\nCapEff:\t0\n"
                           "CapAmb:\t0000000000000000\n")
    assert caps == {"CapPrm": 0xFF, "CapEff": 0, "CapAmb": 0}


def test_tap_and_bridge_exclude_each_other():
    with pytest.raises(ValidationError, match="exclude each other"):
        ho.open_datapath("t0", "br0", 1)


def test_keep_only_leaves_exactly_the_chosen_fds_inheritable():
    code = """
import json, os
from vhostctl.handoff import keep_only
a, b = os.pipe()
os.set_inheritable(a, True); os.set_inheritable(b, True)
c = os.open("/dev/null", os.O_RDONLY)  # close-on-exec by default
keep_only([c])
fds = sorted(int(x) for x in os.listdir("/proc/self/fd"))
print(json.dumps({"c": c, "inh": {fd: os.get_inheritable(fd) for fd in fds
                                  if fd > 2 and os.path.exists(f"/proc/self/fd/{fd}")}}))
"""
    # An inheritable fd handed to the interpreter by *its* parent must be caught too.
    r, w = os.pipe()
    try:
        out = subprocess.run([sys.executable, "-c", code], pass_fds=[r], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    finally:
        os.close(r)
        os.close(w)
    data = json.loads(out)
    inheritable = [int(fd) for fd, on in data["inh"].items() if on]
    assert inheritable == [data["c"]]


def run_cli(*args: str):
    from typer.testing import CliRunner

    from vhostctl.cli import app, commands

    assert commands
    return CliRunner().invoke(app, list(args))


def test_cli_exec_without_placeholders_exits_2():
    r = run_cli("exec", "--tap", "t0", "--", "true")
    assert r.exit_code == 2 and "{tapfds}" in r.stderr


def test_cli_exec_count_mismatch_exits_2():
    r = run_cli("exec", "--queues", "2", "--", "qemu-system-x86_64", "-netdev",
                "tap,fd={tapfds},vhostfd={vhostfds}")
    assert r.exit_code == 2 and "fd= takes one fd" in r.stderr


def test_cli_exec_options_after_the_command_belong_to_it():
    # "-S" after the command name must not be parsed as a vhostctl option.
    r = run_cli("exec", "--user", "root", "qemu", "-S", "-netdev", QEMU_NETDEV)
    assert r.exit_code == 2 and "is root" in r.stderr
