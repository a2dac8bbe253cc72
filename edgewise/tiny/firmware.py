"""Tiny training on a microcontroller: build a generated C project into Cortex-M7 firmware, run it
under QEMU, count its instructions.

The target is QEMU's `mps2-an500` machine (Arm MPS2 board with the AN500 FPGA image: one Cortex-M7
with the double-precision FPv5 FPU). Its memory map, as far as the firmware uses it:

    0x00000000  4 MiB SSRAM   used as flash: vectors, code, read-only data, the frozen weights
                              (the project's ew_flash.bin) and the load image of .data
    0x20000000  4 MiB SSRAM   used as SRAM, but the linker script declares only `sram_bytes` of it
                              (the budget): .data, .bss (arena, trained parameters, buffers), a
                              small heap for newlib's stdio and the stack, back to back

so a model whose RAM does not fit the budget fails to LINK ("region `RAM' overflowed by N bytes"),
before anything runs; what does link uses exactly `FirmwareBuild.sram_used` bytes of SRAM.

The firmware (edgewise/tiny/c/firmware/) is the project's ew_ops.c, ew_model.c and ew_flash.S, plus
startup.c (vector table, reset, faults, heap), main.c (train for the samples file's epochs, then
evaluate; see the output format there) and link.ld.in. It talks to the host through semihosting
(newlib's librdimon: stdio and files on the host), so a samples file far bigger than the SRAM is
read one image at a time. Instructions are counted by a QEMU TCG plugin (insn_count.c, built with
the host's gcc on first use).

    build = build_firmware("out/project", "out/fw", sram_bytes=256 * 1024)
    write_samples("out/samples.bin", x_train, y_train, x_val, y_val, epochs=1)
    run = run_firmware(build, "out/samples.bin", params_out=True, echo=True)
    run.epoch_losses, run.val_acc, run.params          # losses, accuracy, trained params' bytes

Tools (Debian): gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm, and the host's gcc.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgewise.errors import EdgewiseError
from edgewise.files import atomic_dir
from edgewise.files import atomic_path
from edgewise.tiny.cbackend import PROJECT_SOURCES, RESULT_CFLAGS

FIRMWARE_SRC = Path(__file__).resolve().parent / "c" / "firmware"

APT_INSTALL = "sudo apt-get install --no-install-recommends gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"

RAM_ORIGIN = 0x20000000
FLASH_ORIGIN = 0x00000000
MACHINE_RAM_BYTES = 4 * 1024 * 1024  # each of the mps2-an500's two SSRAMs
# newlib-nano's stdio allocates from the heap: the samples FILE and its 1 KiB read buffer, stdout's
# buffer, and printf's float conversion. 4 KiB leaves room over the ~2.6 KiB measured
# (FirmwareRun.heap_peak); startup.c's _sbrk never grows past the reservation.
DEFAULT_HEAP_BYTES = 4096

CFLAGS = [*RESULT_CFLAGS, "-ffunction-sections", "-fdata-sections"]
ARM_FLAGS = ["-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16"]
# nano: newlib-nano (small stdio); rdimon: stdio and files over semihosting; _printf_float: %g in
# nano's printf; -nostartfiles: startup.c replaces rdimon's crt0 (which would put the stack and
# heap wherever QEMU's SYS_HEAPINFO says, outside the budget).
ARM_LINK_FLAGS = ["--specs=nano.specs", "--specs=rdimon.specs", "-nostartfiles", "-u", "_printf_float",
                  "-Wl,--gc-sections"]

SAMPLES_MAGIC = b"EWDS"
SAMPLES_VERSION = 1
SAMPLES_HEADER = struct.Struct("<4sIIIII")  # magic, version, n_train, n_val, image_bytes, epochs


# ---- tools -----------------------------------------------------------------------------------------

def require_tools(qemu: bool = True, host_cc: bool = True) -> None:
    """Checks the cross compiler, newlib (rdimon.specs links), QEMU and (for the plugin and host
    builds) the host's gcc; raises EdgewiseError naming the Debian packages when one is missing."""
    for tool, pkg in (("arm-none-eabi-gcc", "gcc-arm-none-eabi"),) + ((("qemu-system-arm", "qemu-system-arm"),) if qemu else ()):
        if shutil.which(tool) is None:
            raise EdgewiseError(f"{tool} not found (Debian package {pkg}); install the firmware tools with: {APT_INSTALL}")
    if host_cc and shutil.which("gcc") is None:
        raise EdgewiseError("the host's gcc not found (it builds the QEMU instruction-count plugin): sudo apt-get install gcc")
    _check_newlib()


_newlib_ok: set[str] = set()


def _check_newlib() -> None:
    """A one-line program linked with rdimon.specs: fails without libnewlib-arm-none-eabi."""
    gcc = shutil.which("arm-none-eabi-gcc")
    if gcc in _newlib_ok:
        return
    with tempfile.TemporaryDirectory(prefix="ew-newlib-") as d:
        src = Path(d) / "t.c"
        src.write_text("#include <stdio.h>\nint main(void) { puts(\"ok\"); return 0; }\n")
        p = subprocess.run([gcc, *ARM_FLAGS, "--specs=nano.specs", "--specs=rdimon.specs", str(src), "-o", str(Path(d) / "t.elf")],
                           capture_output=True, text=True, check=False)
    if p.returncode != 0:
        tail = _tail(p.stderr, 3)
        raise EdgewiseError(f"arm-none-eabi-gcc cannot link against newlib with rdimon.specs (Debian package "
                            f"libnewlib-arm-none-eabi); install the firmware tools with: {APT_INSTALL}  [{tail}]")
    _newlib_ok.add(gcc)


def _tail(text: str, n: int = 20) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


# ---- build -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FirmwareBuild:
    """A linked firmware image and where its bytes go.

    text: flash-only bytes (vectors, code, read-only data incl. the frozen weights); data: .data
    (in SRAM, with its initial values also in flash); bss: .bss (arena, trained parameters, buffers);
    heap, stack: the reservations. sram_used: the SRAM extent, __stack_top - 0x20000000, which is
    data + bss + heap + stack plus alignment padding, and what the linker checked against
    sram_budget. flash_used: text + data.
    """

    elf: Path
    out_dir: Path
    sram_budget: int
    flash_budget: int
    text: int
    data: int
    bss: int
    heap: int
    stack: int
    sram_used: int
    flash_used: int
    sections: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (address, size)

    def summary(self) -> str:
        return (f"SRAM {self.sram_used} / {self.sram_budget} bytes (data {self.data}, bss {self.bss}, heap {self.heap}, "
                f"stack {self.stack}); flash {self.flash_used} / {self.flash_budget} bytes (text {self.text}, data {self.data})")


def build_firmware(project_dir: str | Path, out_dir: str | Path, sram_bytes: int = 256 * 1024,
                   flash_bytes: int = 4 * 1024 * 1024, stack_bytes: int = 8192,
                   heap_bytes: int = DEFAULT_HEAP_BYTES, extra_cflags: Sequence[str] = ()) -> FirmwareBuild:
    """Compiles and links the generated project in `project_dir` (ew_ops.c, ew_model.c, ew_flash.S with
    its ew_flash.bin) with the firmware sources into `out_dir`/fw.elf (plus fw.map and link.ld).

    RAM is limited to `sram_bytes` and flash to `flash_bytes` by the linker script; if the model does
    not fit, the linker's "region ... overflowed" error is raised as an EdgewiseError with the budget
    and what needs the room. `out_dir` is built beside itself and renamed into place: an existing one
    is replaced only by a complete build.
    """
    require_tools(qemu=False, host_cc=False)
    project_dir = Path(project_dir).resolve()
    out_dir = Path(out_dir).resolve()
    _check_project(project_dir)
    if flash_bytes > MACHINE_RAM_BYTES or sram_bytes > MACHINE_RAM_BYTES:
        raise EdgewiseError(f"the mps2-an500 has {MACHINE_RAM_BYTES} bytes each of flash and SRAM; asked for "
                            f"flash {flash_bytes}, SRAM {sram_bytes}")
    if min(sram_bytes, flash_bytes, heap_bytes) <= 0 or stack_bytes < 512 or stack_bytes % 8 or heap_bytes % 8:
        raise EdgewiseError(f"sizes must be positive, the stack at least 512 bytes, stack and heap multiples of 8: "
                            f"sram {sram_bytes}, flash {flash_bytes}, stack {stack_bytes}, heap {heap_bytes}")
    with atomic_dir(out_dir) as tmp:
        p = _link(project_dir, tmp, sram_bytes, flash_bytes, stack_bytes, heap_bytes, extra_cflags)
        if p.returncode != 0:
            raise _link_error(p, project_dir, sram_bytes, flash_bytes, stack_bytes, heap_bytes, extra_cflags)
    return _describe(out_dir / "fw.elf", out_dir, sram_bytes, flash_bytes)


def _check_project(project_dir: Path) -> None:
    missing = [n for n in ("ew_model.h", *PROJECT_SOURCES) if not (project_dir / n).is_file()]
    if missing:
        raise EdgewiseError(f"{project_dir} is not a generated tiny-training project: no {', '.join(missing)}")


def _link(project_dir: Path, build_dir: Path, sram: int, flash: int, stack: int, heap: int,
          extra_cflags: Sequence[str]) -> subprocess.CompletedProcess:
    script = (FIRMWARE_SRC / "link.ld.in").read_text()
    values = {"flash": flash, "sram": sram, "stack": stack, "heap": heap}
    script = re.sub(r"\{(flash|sram|stack|heap)\}", lambda m: str(values[m.group(1)]), script)
    (build_dir / "link.ld").write_text(script)
    sources = [FIRMWARE_SRC / "startup.c", FIRMWARE_SRC / "main.c"]
    sources += [project_dir / n for n in PROJECT_SOURCES]
    # Run in the build directory with relative outputs, so build.sh there rebuilds it as it is.
    cmd = ["arm-none-eabi-gcc", *CFLAGS, *ARM_FLAGS, *extra_cflags, f"-I{project_dir}", f"-Wa,-I{project_dir}",
           *map(str, sources), "-Tlink.ld", *ARM_LINK_FLAGS, "-Wl,-Map=fw.map", "-lm", "-o", "fw.elf"]
    (build_dir / "build.sh").write_text(" ".join(cmd) + "\n")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=build_dir, check=False)


def _link_error(p: subprocess.CompletedProcess, project_dir: Path, sram: int, flash: int, stack: int, heap: int,
                extra_cflags: Sequence[str]) -> EdgewiseError:
    """The linker's own message, with the budget and (relinked without the budgets) what uses the room."""
    msg = p.stderr
    overflow = re.findall(r"region [`']?(RAM|FLASH)'? overflowed by (\d+) bytes", msg)
    if not overflow:
        return EdgewiseError(f"building the firmware for {project_dir} failed:\n{_tail(msg)}")
    ld_lines = [re.sub(r"^.*?\bld(\.bfd)?: ", "", ln) for ln in msg.splitlines()
                if "will not fit in region" in ln or "overflowed by" in ln]
    quoted = "; ".join(dict.fromkeys(ld_lines))
    detail = ""
    with tempfile.TemporaryDirectory(prefix="ew-fw-sizes-") as d:
        q = _link(project_dir, Path(d), MACHINE_RAM_BYTES, MACHINE_RAM_BYTES, stack, heap, extra_cflags)
        if q.returncode == 0:
            b = _describe(Path(d) / "fw.elf", Path(d), MACHINE_RAM_BYTES, MACHINE_RAM_BYTES)
            big = ", ".join(f"{name} {size}" for name, size in _largest_symbols(b.elf, RAM_ORIGIN, 3))
            detail = (f" It needs SRAM {b.sram_used} bytes (data {b.data}, bss {b.bss}, heap {b.heap}, stack {b.stack}; "
                      f"largest: {big}) and flash {b.flash_used} bytes.")
    return EdgewiseError(f"the firmware does not fit the budget of SRAM {sram} bytes / flash {flash} bytes: the linker "
                         f"says: {quoted}.{detail} Give it a larger budget (sram_bytes, flash_bytes) or plan a smaller model.")


# ---- ELF: section and symbol tables (ELF32, little endian) ----------------------------------------

_SHF_ALLOC = 2
_SHT_SYMTAB, _SHT_NOBITS = 2, 8


def _elf_sections(elf: Path) -> list[dict]:
    b = elf.read_bytes()
    if b[:4] != b"\x7fELF" or b[4] != 1 or b[5] != 1:
        raise EdgewiseError(f"{elf} is not a 32-bit little-endian ELF file")
    shoff, = struct.unpack_from("<I", b, 0x20)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", b, 0x2E)
    raw = [struct.unpack_from("<IIIIIIIIII", b, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = raw[shstrndx][4]
    out = []
    for name, typ, flags, addr, off, size, link, _info, _align, entsize in raw:
        end = b.index(b"\0", strtab_off + name)
        out.append({"name": b[strtab_off + name:end].decode(), "type": typ, "flags": flags, "addr": addr,
                    "offset": off, "size": size, "link": link, "entsize": entsize})
    return out


def _largest_symbols(elf: Path, origin: int, n: int) -> list[tuple[str, int]]:
    """The `n` largest data symbols at or above `origin` (RAM)."""
    b = elf.read_bytes()
    secs = _elf_sections(elf)
    syms = []
    for s in secs:
        if s["type"] != _SHT_SYMTAB:
            continue
        strtab = secs[s["link"]]["offset"]
        for i in range(s["size"] // 16):
            name, value, size, info, _other, _shndx = struct.unpack_from("<IIIBBH", b, s["offset"] + 16 * i)
            if size and (info & 0xF) == 1 and value >= origin:  # STT_OBJECT
                end = b.index(b"\0", strtab + name)
                syms.append((b[strtab + name:end].decode(), size))
    return sorted(syms, key=lambda t: -t[1])[:n]


def _describe(elf: Path, out_dir: Path, sram: int, flash: int) -> FirmwareBuild:
    text = data = bss = heap = stack = 0
    ram_end = RAM_ORIGIN
    sections = {}
    for s in _elf_sections(elf):
        if not s["flags"] & _SHF_ALLOC or s["size"] == 0:
            continue
        sections[s["name"]] = (s["addr"], s["size"])
        if s["addr"] >= RAM_ORIGIN:
            ram_end = max(ram_end, s["addr"] + s["size"])
            if s["name"] == ".heap":
                heap += s["size"]
            elif s["name"] == ".stack":
                stack += s["size"]
            elif s["type"] == _SHT_NOBITS:
                bss += s["size"]
            else:
                data += s["size"]
        else:
            text += s["size"]
    return FirmwareBuild(elf=elf, out_dir=out_dir, sram_budget=sram, flash_budget=flash, text=text, data=data,
                         bss=bss, heap=heap, stack=stack, sram_used=ram_end - RAM_ORIGIN, flash_used=text + data,
                         sections=sections)


# ---- samples file ----------------------------------------------------------------------------------

def _as_int8_images(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.int8:
        raise EdgewiseError(f"{what} must be int8 images [N, C, H, W] (the model's quantized input), got {x.dtype}")
    if x.ndim < 2:
        raise EdgewiseError(f"{what} must be [N, ...] images, got shape {x.shape}")
    return np.ascontiguousarray(x.reshape(x.shape[0], int(np.prod(x.shape[1:]))))


def _as_labels(y, n: int, what: str) -> np.ndarray:
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise EdgewiseError(f"{what}: {y.shape[0]} labels for {n} images")
    if n and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > np.iinfo(np.int32).max):
        raise EdgewiseError(f"{what} must be non-negative integer class labels")
    return y.astype("<i4")


def write_samples(path: str | Path, train_images, train_labels, val_images, val_labels, epochs: int = 1) -> Path:
    """Writes the firmware's samples file (format in main.c): int8 images [N, C, H, W] (numpy or torch,
    batch-1 layout C*H*W per image, as the model takes them), integer labels, train then val."""
    xt = _as_int8_images(train_images, "train images")
    xv = _as_int8_images(val_images, "val images")
    yt = _as_labels(train_labels, xt.shape[0], "train labels")
    yv = _as_labels(val_labels, xv.shape[0], "val labels")
    image_bytes = xt.shape[1] if xt.shape[0] else xv.shape[1]
    if xv.shape[0] and xv.shape[1] != image_bytes or xt.shape[0] and xt.shape[1] != image_bytes:
        raise EdgewiseError(f"train and val images differ in size: {xt.shape[1]} and {xv.shape[1]} bytes")
    if epochs < 0:
        raise EdgewiseError(f"epochs must be >= 0, got {epochs}")
    rec = np.dtype([("image", np.int8, (image_bytes,)), ("label", "<i4")])
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(SAMPLES_HEADER.pack(SAMPLES_MAGIC, SAMPLES_VERSION, xt.shape[0], xv.shape[0], image_bytes, epochs))
        for x, y in ((xt, yt), (xv, yv)):
            r = np.empty(x.shape[0], rec)
            r["image"], r["label"] = x, y
            f.write(r.tobytes())
    return path


@dataclass(frozen=True)
class Samples:
    train_images: np.ndarray  # int8 [n_train, image_bytes]
    train_labels: np.ndarray  # int32 [n_train]
    val_images: np.ndarray
    val_labels: np.ndarray
    epochs: int


def read_samples(path: str | Path) -> Samples:
    """Reads a samples file back (images flattened to [N, image_bytes])."""
    b = Path(path).read_bytes()
    if len(b) < SAMPLES_HEADER.size:
        raise EdgewiseError(f"{path} is too short for a samples file")
    magic, version, n_train, n_val, image_bytes, epochs = SAMPLES_HEADER.unpack_from(b)
    if magic != SAMPLES_MAGIC or version != SAMPLES_VERSION:
        raise EdgewiseError(f"{path} is not an EWDS version {SAMPLES_VERSION} samples file")
    rec = np.dtype([("image", np.int8, (image_bytes,)), ("label", "<i4")])
    if len(b) != SAMPLES_HEADER.size + (n_train + n_val) * rec.itemsize:
        raise EdgewiseError(f"{path}: size does not match its header")
    r = np.frombuffer(b, rec, offset=SAMPLES_HEADER.size)
    return Samples(r["image"][:n_train].copy(), r["label"][:n_train].astype(np.int32), r["image"][n_train:].copy(),
                   r["label"][n_train:].astype(np.int32), epochs)


# ---- run -------------------------------------------------------------------------------------------

@dataclass
class FirmwareRun:
    """What the firmware printed, parsed. epoch_losses: each epoch's mean training loss as printed
    (%.9g, so it round-trips float32); train_loss_bits: the last epoch's mean loss as float32 bits
    (exact); val_acc: None when n_val is 0; params: the trained parameters' raw bytes in
    ew_param_at order (when asked for); insns: guest instructions executed by the whole program
    (when counted); stack_peak, heap_peak: bytes used at most (firmware only)."""

    epoch_losses: list[float]
    train_loss_bits: int | None
    val_acc: float | None
    val_correct: int
    n_val: int
    params: bytes | None
    insns: int | None
    stack_peak: int | None
    heap_peak: int | None
    stdout: str
    wall_s: float

    @property
    def train_loss(self) -> float | None:
        """The last epoch's mean loss, exactly (from its bits)."""
        if self.train_loss_bits is None:
            return None
        return struct.unpack("<f", struct.pack("<I", self.train_loss_bits))[0]


def _plugin_path(cache_dir: Path) -> Path:
    """The instruction-count plugin, built with the host's gcc into `cache_dir` (keyed by its source)."""
    src = FIRMWARE_SRC / "insn_count.c"
    key = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    so = cache_dir / f"libinsn_count-{key}.so"
    if so.exists():
        return so
    if shutil.which("gcc") is None:
        raise EdgewiseError("the host's gcc not found (it builds the QEMU instruction-count plugin): sudo apt-get install gcc")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(so) as tmp:
        p = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-fvisibility=hidden", str(src), "-o", str(tmp)],
                           capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise EdgewiseError(f"building the QEMU plugin {src.name} failed:\n{_tail(p.stderr)}")
    return so


def _qemu_opt(value: str) -> str:
    """A value inside a QEMU -option list: commas are doubled."""
    return value.replace(",", ",,")


def run_firmware(build: FirmwareBuild, samples_path: str | Path, params_out: bool | str | Path | None = None,
                 count_insns: bool = False, timeout: float | None = 3600, echo: bool = False,
                 on_line: Callable[[str], None] | None = None) -> FirmwareRun:
    """Runs the firmware under qemu-system-arm (mps2-an500) on a samples file (write_samples).

    params_out: True to return the trained parameters' bytes in FirmwareRun.params, or a path to
    also keep them in a file. count_insns: count the guest instructions of the whole run with the
    TCG plugin (FirmwareRun.insns). echo prints the firmware's lines as they come (to stderr);
    on_line receives each line. A nonzero exit, a fault or the timeout raise EdgewiseError with the
    end of the output.
    """
    require_tools(qemu=True, host_cc=count_insns)
    samples_path = Path(samples_path).resolve()
    if not samples_path.is_file():
        raise EdgewiseError(f"samples file {samples_path} not found")
    with tempfile.TemporaryDirectory(prefix="ew-qemu-") as d:
        run_dir = Path(d)
        # Semihosting joins argv with spaces and opens paths relative to QEMU's working directory:
        # short names in a private run directory keep any path safe.
        (run_dir / "samples.bin").symlink_to(samples_path)
        args = ["fw", "samples.bin"] + (["params.bin"] if params_out else [])
        cmd = ["qemu-system-arm", "-M", "mps2-an500", "-display", "none", "-monitor", "none", "-serial", "none",
               "-semihosting-config", "enable=on,target=native" + "".join(f",arg={a}" for a in args),
               "-kernel", str(build.elf)]
        if count_insns:
            plugin = _plugin_path(build.out_dir / "plugin")
            cmd += ["-plugin", f"{_qemu_opt(str(plugin))},out={_qemu_opt(str(run_dir / 'insns.txt'))}"]
        stdout, rc, wall = _run_streaming(cmd, run_dir, timeout, echo, on_line, "qemu-system-arm")
        params = (run_dir / "params.bin").read_bytes() if params_out and rc == 0 else None
        insns = None
        if count_insns and rc == 0:
            m = re.search(r"insns = (\d+)", (run_dir / "insns.txt").read_text())
            insns = int(m.group(1)) if m else None
    overflow = _stack_overflow_note(build, stdout)
    if rc != 0:
        raise EdgewiseError(f"the firmware {build.elf} failed in QEMU (exit status {rc}):\n{_tail(stdout)}{overflow}")
    if overflow:
        raise EdgewiseError(f"the firmware {build.elf} ran, but its results cannot be trusted:{overflow}")
    _keep_params(params, params_out)
    return _parse_output(stdout, params, insns, wall)


def _keep_params(params: bytes | None, params_out: bool | str | Path | None) -> None:
    """Writes the parameters' bytes to params_out when that is a path (not True/False/None)."""
    if params is not None and params_out and not isinstance(params_out, bool):
        with atomic_path(params_out) as tmp:
            tmp.write_bytes(params)


STACK_GUARD_BYTES = 32  # startup.c's MPU no-access region at the bottom of the stack reservation


def _stack_overflow_note(build: FirmwareBuild, stdout: str) -> str:
    """A note when the stack reached the bottom of its reservation. The MPU guard faults on an
    overflow that steps onto it; a frame larger than the guard can step over it into the free top
    of the heap reservation, which the painted-memory peak (startup.c) still sees after the fact."""
    m = re.search(r"^stack_peak = (\d+) heap_peak = (\d+)$", stdout, re.MULTILINE)
    if m is None or int(m.group(1)) < build.stack - STACK_GUARD_BYTES:
        return ""
    return (f"\nthe stack reached the bottom of its {build.stack}-byte reservation (measured {m.group(1)} bytes; a stack "
            f"overflow corrupts the heap and .bss below it): build with a larger stack_bytes")


def _run_streaming(cmd: list[str], cwd: Path, timeout: float | None, echo: bool,
                   on_line: Callable[[str], None] | None, what: str) -> tuple[str, int, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", file=sys.stderr, flush=True)
            if on_line:
                on_line(line.rstrip("\n"))
        rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout = "".join(lines)
    if timed_out.is_set():
        raise EdgewiseError(f"{what} did not finish within {timeout} s (raise the timeout for long runs):\n{_tail(stdout)}")
    return stdout, rc, time.perf_counter() - t0


def _parse_output(stdout: str, params: bytes | None, insns: int | None, wall: float) -> FirmwareRun:
    losses = [float(m.group(1)) for m in re.finditer(r"^epoch \d+: loss (\S+)$", stdout, re.MULTILINE)]
    bits = re.search(r"^train_loss_bits = 0x([0-9a-fA-F]{8})$", stdout, re.MULTILINE)
    val = re.search(r"^val_correct = (\d+) n_val = (\d+)$", stdout, re.MULTILINE)
    peaks = re.search(r"^stack_peak = (\d+) heap_peak = (\d+)$", stdout, re.MULTILINE)
    if val is None:
        raise EdgewiseError(f"the firmware's output has no val_correct line:\n{_tail(stdout)}")
    k, n = int(val.group(1)), int(val.group(2))
    return FirmwareRun(epoch_losses=losses, train_loss_bits=int(bits.group(1), 16) if bits else None,
                       val_acc=k / n if n else None, val_correct=k, n_val=n, params=params, insns=insns,
                       stack_peak=int(peaks.group(1)) if peaks else None,
                       heap_peak=int(peaks.group(2)) if peaks else None, stdout=stdout, wall_s=wall)


# ---- instruction counts ----------------------------------------------------------------------------

@dataclass(frozen=True)
class InsnCount:
    """Instructions per training step (or per inference): (insns_2k - insns_k) / k."""

    per_item: float
    k: int
    insns_k: int
    insns_2k: int
    wall_s: float  # both QEMU runs


def insns_per_step(build: FirmwareBuild, train_images, train_labels, k: int = 16,
                   work_dir: str | Path | None = None) -> InsnCount:
    """Guest instructions per training step, measured as the difference of two runs (1 epoch, no
    validation) on the first k and the first 2k training samples, divided by k.

    The plugin counts the whole program's instructions; start-up, reading the header, ew_init,
    printing and exit are the same in both runs and cancel in the difference, which leaves k steps
    plus k samples' file reads (a fread of one record: small beside a step). Samples are reused
    cyclically when fewer than 2k are given.
    """
    return _insns_diff(build, train_images, train_labels, k, work_dir, train=True)


def insns_per_inference(build: FirmwareBuild, images, labels, k: int = 16,
                        work_dir: str | Path | None = None) -> InsnCount:
    """Guest instructions per ew_infer, like insns_per_step: no training, k vs 2k validation samples."""
    return _insns_diff(build, images, labels, k, work_dir, train=False)


def _insns_diff(build: FirmwareBuild, images, labels, k: int, work_dir, train: bool) -> InsnCount:
    if k < 1:
        raise EdgewiseError(f"k must be >= 1, got {k}")
    x = _as_int8_images(images, "images")
    y = _as_labels(labels, x.shape[0], "labels")
    if x.shape[0] == 0:
        raise EdgewiseError("no samples to count instructions on")
    idx = np.arange(2 * k) % x.shape[0]
    empty_x, empty_y = x[:0], y[:0]
    counts, wall = [], 0.0
    with tempfile.TemporaryDirectory(prefix="ew-insns-", dir=work_dir) as d:
        for n in (k, 2 * k):
            path = Path(d) / f"samples-{n}.bin"
            if train:
                write_samples(path, x[idx[:n]], y[idx[:n]], empty_x, empty_y, epochs=1)
            else:
                write_samples(path, empty_x, empty_y, x[idx[:n]], y[idx[:n]], epochs=0)
            r = run_firmware(build, path, count_insns=True)
            counts.append(r.insns)
            wall += r.wall_s
    return InsnCount(per_item=(counts[1] - counts[0]) / k, k=k, insns_k=counts[0], insns_2k=counts[1], wall_s=wall)


# ---- the same main.c on the host, for bit-for-bit comparison --------------------------------------

def build_host(project_dir: str | Path, out_dir: str | Path, extra_cflags: Sequence[str] = ()) -> Path:
    """Builds main.c with the project for the host (gcc, same -std=c99 -O2 -ffp-contract=off) into
    `out_dir`/fw-host; run_host runs it on a samples file like run_firmware."""
    if shutil.which("gcc") is None:
        raise EdgewiseError("the host's gcc not found: sudo apt-get install gcc")
    project_dir = Path(project_dir).resolve()
    _check_project(project_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / "fw-host"
    sources = [FIRMWARE_SRC / "main.c"] + [project_dir / n for n in PROJECT_SOURCES]
    with atomic_path(exe) as tmp:
        cmd = ["gcc", *CFLAGS, *extra_cflags, f"-I{project_dir}", f"-Wa,-I{project_dir}", *map(str, sources), "-lm",
               "-o", str(tmp)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=project_dir, check=False)
        if p.returncode != 0:
            raise EdgewiseError(f"building {project_dir} for the host failed:\n{_tail(p.stderr)}")
    return exe


def run_host(exe: str | Path, samples_path: str | Path, params_out: bool | str | Path | None = None,
             timeout: float | None = 3600, echo: bool = False,
             on_line: Callable[[str], None] | None = None) -> FirmwareRun:
    """Runs a build_host program on a samples file; the result is parsed like run_firmware's."""
    with tempfile.TemporaryDirectory(prefix="ew-host-") as d:
        run_dir = Path(d)
        args = [str(Path(exe).resolve()), str(Path(samples_path).resolve())] + (["params.bin"] if params_out else [])
        stdout, rc, wall = _run_streaming(args, run_dir, timeout, echo, on_line, Path(exe).name)
        params = (run_dir / "params.bin").read_bytes() if params_out and rc == 0 else None
    if rc != 0:
        raise EdgewiseError(f"{exe} failed (exit status {rc}):\n{_tail(stdout)}")
    _keep_params(params, params_out)
    return _parse_output(stdout, params, None, wall)
