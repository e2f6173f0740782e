"""Security rules checked over the source: no shell anywhere, every fd close-on-exec from its
creation, and every struct handed to an ioctl freshly built (ctypes zero-fills a new
instance; a buffer taken over from elsewhere -- ``from_buffer``, ``from_address``, a reused
object -- could carry stale bytes into the kernel through padding or unset fields).

A new call that does not fit these rules fails here with its file and line, to be reviewed.
"""

from __future__ import annotations

import ast
import ctypes
import inspect
from pathlib import Path

import pytest

import vhostctl
from vhostctl import tun
from vhostctl._uapi import if_tun, vhost, virtio_net, virtio_ring

SRC = Path(vhostctl.__file__).parent
FILES = sorted(p for p in SRC.rglob("*.py"))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(SRC.parent)}:{node.lineno}"


PARSED = {p: ast.parse(p.read_text(), str(p)) for p in FILES}


def test_no_shell_anywhere():
    bad = []
    for path, tree in PARSED.items():
        for c in calls(tree):
            name = dotted(c.func)
            if name in ("os.system", "os.popen", "os.spawnlp", "os.spawnvp", "pty.spawn") or \
                    name.startswith("subprocess.") or \
                    any(k.arg == "shell" for k in c.keywords):
                bad.append(f"{where(path, c)} {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""]
                bad += [f"{where(path, node)} imports {m}" for m in mods if m == "subprocess"]
    assert not bad, "vhostctl runs no shell and no subprocess: " + "; ".join(bad)


def test_fds_are_close_on_exec_from_creation():
    """os.open/ioctl/eventfd only at the choke point, with the CLOEXEC flag in the same
    call; memfds with MFD_CLOEXEC; inheritable only in exec's hand-off."""
    bad = []
    for path, tree in PARSED.items():
        for c in calls(tree):
            name = dotted(c.func)
            text = ast.unparse(c)
            if name in ("os.open", "fcntl.ioctl", "os.eventfd") and path.name != "_fd.py":
                bad.append(f"{where(path, c)} {name} outside _fd.py")
            if name == "os.open" and "O_CLOEXEC" not in text:
                bad.append(f"{where(path, c)} os.open without O_CLOEXEC")
            if name == "os.eventfd" and "EFD_CLOEXEC" not in text:
                bad.append(f"{where(path, c)} eventfd without EFD_CLOEXEC")
            if name in ("os.dup2",) and "inheritable=False" not in text:
                bad.append(f"{where(path, c)} dup2 makes an inheritable fd")
            if name == "os.set_inheritable" and path.name != "handoff.py":
                bad.append(f"{where(path, c)} set_inheritable outside exec's hand-off")
            if "memfd_create" in name or (name == "_fd.call" and "memfd_create" in text):
                fn = inspect.getsource(__import__("vhostctl.memory").memory._map_memfd)
                if "MFD_CLOEXEC" not in fn:
                    bad.append(f"{where(path, c)} memfd without MFD_CLOEXEC")
    assert not bad, "; ".join(bad)


# -- ioctl arguments --------------------------------------------------------------------------

STRUCT_MODULES = ("T", "V")  # `from ._uapi import if_tun as T`, `vhost as V`
FRESH_BUILDERS = {"_ifreq", "ctypes.c_int", "ctypes.c_uint", "ctypes.c_uint64",
                  "ctypes.c_ulong"}
# Function parameters passed straight to an ioctl, and why that is safe.
PARAMS_OK = {
    ("tun.py", "_set_value", "value"): "passed by value: an int, no memory",
    ("vhost.py", "set_mem_table", "table"): "GuestMemory.table(): a new vhost_memory_with()",
}


def fresh(node: ast.AST, assigned: dict[str, ast.AST]) -> bool:
    if node is None or isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Call):
        name = dotted(node.func)
        head, _, attr = name.partition(".")
        return name in FRESH_BUILDERS or (head in STRUCT_MODULES and attr[:1].islower())
    if isinstance(node, ast.Name) and node.id in assigned:
        return fresh(assigned[node.id], {})
    return False


def ioctl_args():
    for path, tree in PARSED.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assigned = {t.id: n.value for n in ast.walk(fn) if isinstance(n, ast.Assign)
                        for t in n.targets if isinstance(t, ast.Name)}
            params = {a.arg for a in fn.args.args}
            for c in calls(fn):
                if dotted(c.func) == "_fd.ioctl":
                    arg = c.args[2] if len(c.args) > 2 else None
                    yield path, fn.name, c, arg, assigned, params


def test_every_ioctl_argument_is_built_fresh():
    seen, bad = 0, []
    for path, fn, c, arg, assigned, params in ioctl_args():
        seen += 1
        if fresh(arg, assigned):
            continue
        if isinstance(arg, ast.Name) and arg.id in params and \
                (path.name, fn, arg.id) in PARAMS_OK:
            continue
        bad.append(f"{where(path, c)} in {fn}(): {ast.unparse(arg)}")
    assert seen >= 20, f"only {seen} ioctl calls found: has the choke point moved?"
    assert not bad, "ioctl arguments not built fresh in the calling function: " + "; ".join(bad)


def test_the_fresh_builders_are_fresh():
    src = inspect.getsource(tun._ifreq)
    assert "T.ifreq()" in src
    req = tun._ifreq("vt0", 0x1002)
    raw = bytes(req)
    assert raw[:3] == b"vt0" and not any(raw[3:16]) and not any(raw[18:])
    table = vhost.vhost_memory_with(4)
    assert table.nregions == 4 and not any(bytes(table)[4:])  # set by the builder, rest 0
    mem_src = inspect.getsource(__import__("vhostctl.memory").memory.GuestMemory.table)
    assert "V.vhost_memory_with(" in mem_src


@pytest.mark.parametrize("mod", [if_tun, vhost, virtio_net, virtio_ring])
def test_every_uapi_struct_starts_all_zero(mod):
    structs = [v for v in vars(mod).values() if isinstance(v, type) and
               issubclass(v, ctypes.Structure | ctypes.Union) and v not in
               (ctypes.Structure, ctypes.Union)]
    assert structs or mod is virtio_ring
    for cls in structs:
        assert not any(bytes(cls())), cls.__name__


def test_no_ioctl_argument_comes_from_foreign_memory():
    bad = []
    for path, tree in PARSED.items():
        for c in calls(tree):
            name = dotted(c.func)
            if name.endswith(".from_address"):
                bad.append(f"{where(path, c)} {name}")
            # memory.py takes the address of a guest memory mapping that way, nothing more.
            if name.endswith(".from_buffer") and path.name not in ("memory.py",):
                bad.append(f"{where(path, c)} {name}")
    assert not bad, "; ".join(bad)
