"""The Python header mirrors against the C headers, compiled.

A C probe is generated from the Python side: for every public constant and ioctl it
prints the macro's value (``#ifdef``-guarded, so symbols a header lacks are detected),
for every structure its sizeof, alignment, and each member's offsetof and sizeof.  The
probe is built with gcc against every header tree available:

- the system headers (/usr/include: Debian's linux-libc-dev, v6.1 on bookworm);
- the raw uapi tree of the newest ``/usr/src/linux-headers-6.12*-common`` (Debian package
  ``linux-headers-6.12.*+deb12-common``), or the tree named by ``VHOSTCTL_UAPI_TREE``.
  Raw means not passed through ``make headers_install``, so the probe supplies what that
  step would: empty ``<linux/compiler*.h>``, ``__user``/``__force``/``__iomem`` defined
  away, ``__EXPORTED_HEADERS__`` defined.

Any mismatch fails naming the symbol and the tree.  A symbol no tree defines is checked
against its upstream definition copied into ``test_ioc.py`` (KNOWN_*).  Finally the set
of symbols checked must be every public constant, ioctl and structure of the mirrors.

No skipping: without gcc or the system headers the test fails, unless
``VHOSTCTL_SKIP_ABI=1``.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from vhostctl._uapi.bits import BitNames
from vhostctl._uapi.ioc import Ioctl

_HERE = Path(__file__).resolve().parent


def _load_known() -> ModuleType:
    # By path, so it works whatever pytest's import mode; the module holds only data and
    # its own tests (which are not collected from here).
    spec = importlib.util.spec_from_file_location("_vhostctl_abi_known", _HERE / "test_ioc.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load tests/unit/test_ioc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


known = _load_known()

pytestmark = pytest.mark.skipif(
    os.environ.get("VHOSTCTL_SKIP_ABI") == "1", reason="VHOSTCTL_SKIP_ABI=1"
)

# <net/if.h> (glibc) for struct ifreq/ifmap/sockaddr and IFNAMSIZ; the rest are the uapi
# headers the modules mirror.  vhost.h pulls in vhost_types.h.
HEADERS = (
    "stddef.h",
    "stdio.h",
    "net/if.h",
    "linux/filter.h",
    "linux/if_tun.h",
    "linux/nsfs.h",
    "linux/vhost.h",
    "linux/virtio_config.h",
    "linux/virtio_net.h",
    "linux/virtio_ring.h",
)

# Values an older header tree may show for a symbol that has since changed.  Accepted,
# but such a tree does not count as having verified the symbol.
OLDER_VALUES: dict[str, set[int]] = {
    # include/uapi/linux/virtio_config.h: 41 until VIRTIO_F_ADMIN_VQ took bit 41.
    "VIRTIO_TRANSPORT_F_END": {41},
}

_ARCH_DIRS = {
    "x86_64": "x86",
    "i686": "x86",
    "i386": "x86",
    "aarch64": "arm64",
    "arm64": "arm64",
    "ppc64le": "powerpc",
    "ppc64": "powerpc",
    "s390x": "s390",
    "riscv64": "riscv",
    "loongarch64": "loongarch",
    "mips64": "mips",
}


# ---------------------------------------------------------------------------------------
# The Python side
# ---------------------------------------------------------------------------------------


@dataclass
class Field:
    path: str  # C member designator, e.g. "csum.start" or "ifr_flags"
    offset: int
    size: int | None  # None: flexible array member (no sizeof in C)


@dataclass
class Layout:
    size: int
    align: int
    fields: list[Field]


def _is_struct(v: object) -> bool:
    return isinstance(v, type) and issubclass(v, (ctypes.Structure, ctypes.Union))


def _walk(cls: type, prefix: str, base: int, out: list[Field]) -> None:
    """C-visible members of a ctypes type, nested ones as dotted designators.

    ``_pad*`` fields are Python-only (C padding is implicit; offsets and sizeof catch
    it).  An anonymous Python field whose name starts with ``_`` is an anonymous C union
    or struct: its members appear at the parent level.  An anonymous field with a C name
    (``ifreq.ifr_ifru``) is checked itself, and its members at the parent level too,
    which in C are macros (``#define ifr_flags ifr_ifru.ifru_flags``).
    """
    anonymous = getattr(cls, "_anonymous_", ())
    for fname, ftype, *_ in cls._fields_:
        if fname.startswith("_pad"):
            continue
        off = base + getattr(cls, fname).offset
        if fname in anonymous and fname.startswith("_"):
            _walk(ftype, prefix, off, out)
            continue
        path = prefix + fname
        flexible = issubclass(ftype, ctypes.Array) and ftype._length_ == 0
        out.append(Field(path, off, None if flexible else ctypes.sizeof(ftype)))
        if fname in anonymous:
            _walk(ftype, prefix, off, out)
        elif _is_struct(ftype):
            _walk(ftype, path + ".", off, out)


def py_layout(cls: type) -> Layout:
    fields: list[Field] = []
    _walk(cls, "", 0, fields)
    return Layout(ctypes.sizeof(cls), ctypes.alignment(cls), fields)


@dataclass
class PySide:
    modules: list[ModuleType]
    consts: dict[str, int] = field(default_factory=dict)  # ints and Ioctls
    structs: dict[str, type] = field(default_factory=dict)
    tables: dict[str, BitNames] = field(default_factory=dict)  # "module.NAME" -> table
    owner: dict[str, str] = field(default_factory=dict)


def python_side() -> PySide:
    side = PySide(known.uapi_modules())
    for mod in side.modules:
        short = mod.__name__.rsplit(".", 1)[1]
        for name, v in vars(mod).items():
            if name.startswith("_"):
                continue
            if isinstance(v, BitNames):
                side.tables[f"{short}.{name}"] = v
            elif _is_struct(v) and v.__module__ == mod.__name__:
                side.structs[name] = v
                side.owner[name] = short
            elif name[:1].isupper() and isinstance(v, int) and not isinstance(v, bool):
                if name in side.consts and side.consts[name] != int(v):
                    raise AssertionError(f"{name} differs between modules")
                side.consts[name] = v
                side.owner.setdefault(name, short)
    return side


# ---------------------------------------------------------------------------------------
# The C side
# ---------------------------------------------------------------------------------------


@dataclass
class Tree:
    label: str
    cflags: list[str]


@dataclass
class CStruct:
    size: int
    align: int
    fields: dict[str, tuple[int, int | None]]


@dataclass
class TreeResult:
    tree: Tree
    consts: dict[str, int] = field(default_factory=dict)
    structs: dict[str, CStruct] = field(default_factory=dict)
    missing_structs: dict[str, str] = field(default_factory=dict)  # name -> gcc stderr


def _version_key(path: str) -> tuple[int, ...]:
    m = re.search(r"linux-headers-([\d.]+)", path)
    return tuple(int(x) for x in m.group(1).strip(".").split(".")) if m else ()


def _raw_uapi_tree(root: Path, shim: Path) -> Tree:
    arch = _ARCH_DIRS.get(platform.machine(), platform.machine())
    shim.joinpath("linux").mkdir(parents=True, exist_ok=True)
    for h in ("compiler.h", "compiler_types.h"):
        shim.joinpath("linux", h).write_text("/* stripped by headers_install */\n")
    flags = ["-D__EXPORTED_HEADERS__", "-D__user=", "-D__force=", "-D__iomem="]
    flags += ["-I", str(root / "include" / "uapi")]
    arch_uapi = root / "arch" / arch / "include" / "uapi"
    if arch_uapi.is_dir():
        flags += ["-I", str(arch_uapi)]
    flags += ["-I", str(shim)]
    return Tree(f"{root}/include/uapi", flags)


def header_trees(tmp: Path) -> list[Tree]:
    trees = [Tree("system /usr/include (linux-libc-dev)", [])]
    env = os.environ.get("VHOSTCTL_UAPI_TREE")
    roots = [env] if env else sorted(
        glob.glob("/usr/src/linux-headers-6.12*-common"), key=_version_key
    )[-1:]
    for r in roots:
        if Path(r, "include", "uapi", "linux", "vhost.h").is_file():
            trees.append(_raw_uapi_tree(Path(r), tmp / "shim"))
    return trees


def _prelude() -> str:
    return "".join(f"#include <{h}>\n" for h in HEADERS)


def _const_probe(names: list[str]) -> str:
    body = "".join(
        f'#ifdef {n}\n  printf("K %s %lld\\n", "{n}", (long long)({n}));\n#endif\n'
        for n in names
    )
    return f"{_prelude()}\nint main(void)\n{{\n{body}  return 0;\n}}\n"


def _struct_lines(name: str, layout: Layout) -> str:
    s = f"struct {name}"
    lines = [
        f'  printf("S %s %zu %zu\\n", "{name}", sizeof({s}), __alignof__({s}));\n'
    ]
    for f in layout.fields:
        size = "-1LL" if f.size is None else f"(long long)sizeof((({s} *)0)->{f.path})"
        lines.append(
            f'  printf("F %s %s %zu %lld\\n", "{name}", "{f.path}", '
            f"offsetof({s}, {f.path}), {size});\n"
        )
    return "".join(lines)


def _struct_probe(layouts: dict[str, Layout]) -> str:
    body = "".join(_struct_lines(n, lay) for n, lay in layouts.items())
    return f"{_prelude()}\nint main(void)\n{{\n{body}  return 0;\n}}\n"


class CompileError(Exception):
    pass


def _run_probe(src: str, tree: Tree, work: Path, stem: str) -> str:
    c = work / f"{stem}.c"
    exe = work / stem
    c.write_text(src)
    cc = subprocess.run(
        ["gcc", "-std=gnu11", "-w", *tree.cflags, "-o", str(exe), str(c)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if cc.returncode != 0:
        raise CompileError(cc.stderr.strip())
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True)
    return run.stdout


def probe_tree(tree: Tree, side: PySide, names: list[str], work: Path) -> TreeResult:
    res = TreeResult(tree)
    for line in _run_probe(_const_probe(names), tree, work, "consts").splitlines():
        _, name, value = line.split()
        res.consts[name] = int(value)
    layouts = {n: py_layout(cls) for n, cls in sorted(side.structs.items())}
    try:
        outputs = [_run_probe(_struct_probe(layouts), tree, work, "structs")]
    except CompileError:
        # Some structure (or member) is not in this tree: find which, one at a time.
        outputs = []
        for n, lay in layouts.items():
            try:
                outputs.append(_run_probe(_struct_probe({n: lay}), tree, work, f"s_{n}"))
            except CompileError as e:
                res.missing_structs[n] = str(e)
    for out in outputs:
        for line in out.splitlines():
            kind, name, *rest = line.split()
            if kind == "S":
                res.structs[name] = CStruct(int(rest[0]), int(rest[1]), {})
            else:
                size = int(rest[2])
                res.structs[name].fields[rest[0]] = (int(rest[1]), None if size < 0 else size)
    return res


@dataclass
class Abi:
    side: PySide
    results: list[TreeResult]
    broken_trees: dict[str, str]


@pytest.fixture(scope="module")
def abi(tmp_path_factory: pytest.TempPathFactory) -> Abi:
    if shutil.which("gcc") is None:
        pytest.fail(
            "gcc not found: the ABI test compiles the kernel headers "
            "(apt-get install gcc linux-libc-dev), or set VHOSTCTL_SKIP_ABI=1",
            pytrace=False,
        )
    work = tmp_path_factory.mktemp("abi")
    side = python_side()
    names = sorted(
        set(side.consts) | {n for t in side.tables.values() for n, _ in t.items()}
    )
    results: list[TreeResult] = []
    broken: dict[str, str] = {}
    for i, tree in enumerate(header_trees(work)):
        tdir = work / f"tree{i}"
        tdir.mkdir()
        try:
            results.append(probe_tree(tree, side, names, tdir))
        except CompileError as e:
            if i == 0:
                pytest.fail(
                    "the system kernel headers do not compile "
                    f"(apt-get install linux-libc-dev):\n{e}",
                    pytrace=False,
                )
            broken[tree.label] = str(e)
            warnings.warn(f"header tree {tree.label} does not compile: {e}", stacklevel=1)
    return Abi(side, results, broken)


# ---------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------


def compare_constants(abi: Abi) -> tuple[dict[str, list[str]], list[str]]:
    """(name -> trees that verified it, failures)."""
    verified: dict[str, list[str]] = {}
    failures: list[str] = []
    for name, py in sorted(abi.side.consts.items()):
        for r in abi.results:
            if name not in r.consts:
                continue
            c = r.consts[name]
            if c == int(py):
                verified.setdefault(name, []).append(r.tree.label)
            elif c not in OLDER_VALUES.get(name, ()):
                shown = f"{int(py):#x} vs C {c:#x}" if isinstance(py, Ioctl) else f"{py} vs C {c}"
                owner = abi.side.owner[name]
                failures.append(f"{name} ({owner}): Python {shown} in {r.tree.label}")
    return verified, failures


def _c_layout_matches(py: Layout, c: CStruct) -> list[str]:
    errs = []
    if (py.size, py.align) != (c.size, c.align):
        errs.append(f"sizeof/alignof Python {py.size}/{py.align} vs C {c.size}/{c.align}")
    for f in py.fields:
        cf = c.fields.get(f.path)
        if cf != (f.offset, f.size):
            errs.append(f".{f.path}: Python offset/size {f.offset}/{f.size} vs C {cf}")
    return errs


def compare_structs(abi: Abi) -> tuple[dict[str, list[str]], list[str]]:
    verified: dict[str, list[str]] = {}
    failures: list[str] = []
    for name, cls in sorted(abi.side.structs.items()):
        lay = py_layout(cls)
        for r in abi.results:
            if name not in r.structs:
                continue
            errs = _c_layout_matches(lay, r.structs[name])
            if errs:
                failures += [f"struct {name}: {e} in {r.tree.label}" for e in errs]
            else:
                verified.setdefault(name, []).append(r.tree.label)
    return verified, failures


def check_known(abi: Abi, names: set[str]) -> tuple[set[str], list[str]]:
    """Check symbols no tree verified against test_ioc's KNOWN_*; (checked, failures)."""
    checked: set[str] = set()
    failures: list[str] = []
    for name in sorted(names):
        if name in known.KNOWN_IOCTLS:
            d, t, nr, size, cite = known.KNOWN_IOCTLS[name]
            v = abi.side.consts[name]
            got = (v.direction, v.type, v.nr, v.size) if isinstance(v, Ioctl) else v
            if got != (d, t, nr, size):
                failures.append(f"{name}: Python {got} vs known {(d, t, nr, size)} ({cite})")
            checked.add(name)
        elif name in known.KNOWN_CONSTANTS:
            value, cite = known.KNOWN_CONSTANTS[name]
            if abi.side.consts[name] != value or isinstance(abi.side.consts[name], Ioctl):
                failures.append(f"{name}: Python {abi.side.consts[name]} vs known {value} ({cite})")
            checked.add(name)
        elif name in known.KNOWN_STRUCTS:
            size, align, members, cite = known.KNOWN_STRUCTS[name]
            cls = abi.side.structs[name]
            got = (ctypes.sizeof(cls), ctypes.alignment(cls), known.c_members(cls))
            if got != (size, align, members):
                failures.append(f"struct {name}: Python {got} vs known {(size, align, members)}")
            checked.add(name)
    return checked, failures


def _fmt(failures: list[str]) -> str:
    return "\n".join(failures)


def test_constants_and_ioctls_match_c(abi: Abi) -> None:
    _, failures = compare_constants(abi)
    assert not failures, "\n" + _fmt(failures)


def test_struct_layouts_match_c(abi: Abi) -> None:
    _, failures = compare_structs(abi)
    assert not failures, "\n" + _fmt(failures)


def test_symbols_no_header_has_match_known_definitions(abi: Abi) -> None:
    consts, _ = compare_constants(abi)
    structs, _ = compare_structs(abi)
    rest = (set(abi.side.consts) - set(consts)) | (set(abi.side.structs) - set(structs))
    _, failures = check_known(abi, rest)
    assert not failures, "\n" + _fmt(failures)


def test_name_tables_match_c(abi: Abi) -> None:
    """Every name in every BitNames table means the bit the C macro says, including the
    ring bits 28/29 written as literals in virtio_net.FEATURES."""
    failures = []
    for table_name, table in sorted(abi.side.tables.items()):
        for name, mask in table.items():
            want = mask.bit_length() - 1 if table.numbered else mask
            where = [r for r in abi.results if name in r.consts]
            for r in where:
                if r.consts[name] != want:
                    failures.append(f"{table_name}[{name}] = {want} vs C {r.consts[name]} "
                                    f"in {r.tree.label}")
            if name in abi.side.consts and abi.side.consts[name] != want:
                failures.append(f"{table_name}[{name}] = {want} vs module {abi.side.consts[name]}")
            if not where and name not in known.KNOWN_CONSTANTS:
                failures.append(f"{table_name}[{name}]: in no header and no known definition")
            elif not where and known.KNOWN_CONSTANTS[name][0] != want:
                failures.append(f"{table_name}[{name}] = {want} vs known "
                                f"{known.KNOWN_CONSTANTS[name]}")
    assert not failures, "\n" + _fmt(failures)


def test_variable_length_helpers(abi: Abi) -> None:
    from vhostctl._uapi import vhost

    sysr = abi.results[0]
    mem, reg = sysr.structs["vhost_memory"], sysr.structs["vhost_memory_region"]
    m = vhost.vhost_memory_with(3)
    assert (m.nregions, ctypes.sizeof(m)) == (3, mem.size + 3 * reg.size)
    assert type(m).regions.offset == mem.fields["regions"][0]
    fa = vhost.vhost_features_array_with(2)
    assert (fa.count, ctypes.sizeof(fa), type(fa).features.offset) == (2, 24, 8)


def test_every_symbol_is_checked(abi: Abi) -> None:
    """Compared with a header or checked against a known definition: nothing escapes."""
    consts, _ = compare_constants(abi)
    structs, _ = compare_structs(abi)
    everything = set(abi.side.consts) | set(abi.side.structs)
    by_c = set(consts) | set(structs)
    by_known, _ = check_known(abi, everything - by_c)
    unchecked = everything - by_c - by_known
    details = []
    for n in sorted(unchecked):
        if any(n in r.consts or n in r.structs for r in abi.results):
            details.append(f"{n} ({abi.side.owner[n]}): differs from C (see the tests above)")
            continue
        why = ""
        for r in abi.results:
            if n in r.missing_structs:
                why = f"; gcc in {r.tree.label}: {r.missing_structs[n].splitlines()[-1]}"
        details.append(f"{n} ({abi.side.owner[n]}): in no header tree, no KNOWN_* entry{why}")
    assert not unchecked, "\n" + _fmt(details)
    assert by_c | by_known == everything


def test_report(abi: Abi) -> None:
    """Which tree verified what (shown with ``pytest -rP``)."""
    consts, _ = compare_constants(abi)
    structs, _ = compare_structs(abi)
    verified = {**consts, **structs}
    everything = set(abi.side.consts) | set(abi.side.structs)
    print("modules:", ", ".join(m.__name__ for m in abi.side.modules))
    for r in abi.results:
        print(f"tree {r.tree.label}: {sum(r.tree.label in v for v in verified.values())} "
              "symbols verified")
    for label, err in abi.broken_trees.items():
        print(f"tree {label}: does not compile: {err.splitlines()[-1] if err else ''}")
    only = sorted(
        n for n, v in verified.items() if len(abi.results) > 1 and v == [abi.results[-1].tree.label]
    )
    print("only in the newer tree:", " ".join(only) or "-")
    print("by known definition only:", " ".join(sorted(everything - set(verified))) or "-")
