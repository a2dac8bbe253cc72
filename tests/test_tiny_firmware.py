"""The Cortex-M7 firmware harness (edgewise.tiny.firmware) on a small stand-in project: the samples
file, the tool checks, the linker's SRAM budget check, and a run in QEMU that agrees bit for bit
with the same C built for the host. The real generated model's end-to-end test lives elsewhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from edgewise.errors import EdgewiseError
from edgewise.tiny import firmware as fw

needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="needs gcc-arm-none-eabi")
needs_qemu = pytest.mark.skipif(
    shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None or shutil.which("gcc") is None,
    reason="needs gcc-arm-none-eabi, qemu-system-arm and the host's gcc",
)

# ---- a stand-in for a generated project: frozen int8 features (flash) -> trained fp32 linear (RAM) ----

HIDDEN, IMAGE_BYTES, CLASSES = 16, 64, 4

STANDIN_FILES = {
    "ew_model.h": f"""#ifndef EW_MODEL_H
#define EW_MODEL_H
#include <stdint.h>
#define EW_IMAGE_BYTES {IMAGE_BYTES}
#define EW_N_CLASSES {CLASSES}
#define EW_ARENA_BYTES @ARENA@
void ew_init(void);
int ew_infer(const int8_t *img);
float ew_train_step(const int8_t *img, int label);
const float *ew_logits(void);
typedef struct {{ const char *name; void *data; int dtype; int numel; }} ew_param;
int ew_n_params(void);
const ew_param *ew_param_at(int i);
#endif
""",
    "ew_ops.h": """#include <stdint.h>
void ew_features(const int8_t *w, const int8_t *x, int in, int out, float scale, float *h);
void ew_linear(const float *h, int in, const float *w, const float *b, int out, float *y);
float ew_xent(const float *logits, int n, int label, float *g);
""",
    "ew_ops.c": """#include <math.h>
#include "ew_ops.h"
void ew_features(const int8_t *w, const int8_t *x, int in, int out, float scale, float *h) {
    for (int o = 0; o < out; o++) {
        int32_t acc = 0;
        for (int i = 0; i < in; i++) acc += (int32_t)w[o * in + i] * x[i];
        float v = (float)acc * scale;
        h[o] = v > 0.0f ? v : 0.0f;
    }
}
void ew_linear(const float *h, int in, const float *w, const float *b, int out, float *y) {
    for (int o = 0; o < out; o++) {
        float s = b[o];
        for (int i = 0; i < in; i++) s += w[o * in + i] * h[i];
        y[o] = s;
    }
}
float ew_xent(const float *logits, int n, int label, float *g) {
    float m = logits[0], z = 0.0f;
    for (int i = 1; i < n; i++) if (logits[i] > m) m = logits[i];
    for (int i = 0; i < n; i++) z += (float)exp((double)(logits[i] - m));
    for (int i = 0; i < n; i++) g[i] = (float)exp((double)(logits[i] - m)) / z - (i == label ? 1.0f : 0.0f);
    return (float)log((double)z) + m - logits[label];
}
""",
    "ew_model.c": f"""#include "ew_model.h"
#include "ew_ops.h"
#define H {HIDDEN}
#define C EW_N_CLASSES
extern const int8_t ew_flash[];
static float arena[EW_ARENA_BYTES / 4];
static float w1[C * H], b1[C];
static const ew_param params[2] = {{{{"w1", w1, 2, C * H}}, {{"b1", b1, 2, C}}}};
@EXTRA@
void ew_init(void) {{
    for (int i = 0; i < C * H; i++) w1[i] = (float)((i * 7) % 11 - 5) * 0.01f;
    for (int i = 0; i < C; i++) b1[i] = 0.0f;
}}
static void forward(const int8_t *img) {{
    ew_features(ew_flash, img, EW_IMAGE_BYTES, H, 1.0f / 2048.0f, arena);
    ew_linear(arena, H, w1, b1, C, arena + H);
}}
int ew_infer(const int8_t *img) {{
    int best = 0;
    forward(img);
    for (int i = 1; i < C; i++) if (arena[H + i] > arena[H + best]) best = i;
    return best;
}}
float ew_train_step(const int8_t *img, int label) {{
    float *g = arena + H + C, loss;
    @STEP@
    forward(img);
    loss = ew_xent(arena + H, C, label, g);
    for (int o = 0; o < C; o++) {{
        for (int i = 0; i < H; i++) w1[o * H + i] -= 0.05f * (g[o] * arena[i]);
        b1[o] -= 0.05f * g[o];
    }}
    return loss;
}}
const float *ew_logits(void) {{ return arena + H; }}
int ew_n_params(void) {{ return 2; }}
const ew_param *ew_param_at(int i) {{ return &params[i]; }}
""",
    "ew_flash.S": """    .section .rodata
    .balign 16
    .global ew_flash
ew_flash:
    .incbin "ew_flash.bin"
    .section .note.GNU-stack,"",%progbits
""",
}


def write_standin(d: Path, arena_bytes: int = 4 * (HIDDEN + 2 * CLASSES), extra: str = "", step: str = "") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in STANDIN_FILES.items():
        (d / name).write_text(text.replace("@ARENA@", str(arena_bytes)).replace("@EXTRA@", extra).replace("@STEP@", step))
    rng = np.random.default_rng(0)
    (d / "ew_flash.bin").write_bytes(rng.integers(-64, 64, size=(HIDDEN, IMAGE_BYTES), dtype=np.int8).tobytes())
    return d


def standin_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a bright 4x4 block in quadrant c of an 8x8 image, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    x = rng.integers(-20, 20, size=(n, 1, 8, 8))
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 0, r * 4:(r + 1) * 4, q * 4:(q + 1) * 4] += 90
    return np.clip(x, -128, 127).astype(np.int8), y


@pytest.fixture(scope="module")
def standin_build(tmp_path_factory):
    d = tmp_path_factory.mktemp("standin")
    return fw.build_firmware(write_standin(d / "project"), d / "fw")


# ---- samples file -----------------------------------------------------------------------------------

def test_samples_round_trip(tmp_path):
    xt, yt = standin_data(7, 0)
    xv, yv = standin_data(3, 1)
    path = fw.write_samples(tmp_path / "s.bin", torch.from_numpy(xt), torch.from_numpy(yt), xv, yv.tolist(), epochs=2)
    b = path.read_bytes()
    assert b[:4] == b"EWDS" and len(b) == 24 + 10 * (64 + 4)
    assert np.frombuffer(b[4:24], "<u4").tolist() == [1, 7, 3, 64, 2]
    assert b[24:24 + 64] == xt[0].tobytes() and int.from_bytes(b[88:92], "little", signed=True) == yt[0]
    s = fw.read_samples(path)
    assert s.epochs == 2
    np.testing.assert_array_equal(s.train_images, xt.reshape(7, -1))
    np.testing.assert_array_equal(s.train_labels, yt)
    np.testing.assert_array_equal(s.val_images, xv.reshape(3, -1))
    np.testing.assert_array_equal(s.val_labels, yv)
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically, nothing left over


def test_samples_errors(tmp_path):
    xt, yt = standin_data(4, 0)
    with pytest.raises(EdgewiseError, match="int8"):
        fw.write_samples(tmp_path / "s.bin", xt.astype(np.float32), yt, xt[:0], yt[:0])
    with pytest.raises(EdgewiseError, match="3 labels for 4 images"):
        fw.write_samples(tmp_path / "s.bin", xt, yt[:3], xt[:0], yt[:0])
    with pytest.raises(EdgewiseError, match="differ in size"):
        fw.write_samples(tmp_path / "s.bin", xt, yt, xt[:, :, :4], yt)
    assert not (tmp_path / "s.bin").exists()


# ---- tools ------------------------------------------------------------------------------------------

def test_missing_tools_name_the_debian_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EdgewiseError, match="gcc-arm-none-eabi") as e:
        fw.require_tools()
    assert "apt-get install --no-install-recommends gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm" in str(e.value)
    with pytest.raises(EdgewiseError, match="arm-none-eabi-gcc not found"):
        fw.build_firmware(write_standin(tmp_path / "p"), tmp_path / "fw")
    arm_gcc = shutil.which("arm-none-eabi-gcc", path=os.defpath + ":/usr/bin")
    if arm_gcc:
        (tmp_path / "arm-none-eabi-gcc").symlink_to(arm_gcc)
        with pytest.raises(EdgewiseError, match="qemu-system-arm not found"):
            fw.require_tools()


# ---- build ------------------------------------------------------------------------------------------

@needs_arm
def test_sram_overflow_is_the_linkers_error(tmp_path, standin_build):
    project = write_standin(tmp_path / "big", arena_bytes=300 * 1024)
    out = tmp_path / "fw"
    out.mkdir()
    (out / "keep").write_text("an earlier build")
    with pytest.raises(EdgewiseError) as e:
        fw.build_firmware(project, out, sram_bytes=256 * 1024)
    msg = str(e.value)
    assert "region `RAM' overflowed by" in msg and "SRAM 262144 bytes" in msg
    assert re.search(r"largest: arena 307200", msg)
    needed = int(re.search(r"It needs SRAM (\d+) bytes", msg).group(1))
    overflow = int(re.search(r"overflowed by (\d+) bytes", msg).group(1))
    assert needed == 256 * 1024 + overflow
    assert (out / "keep").read_text() == "an earlier build"  # a failed build leaves the old one alone
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # the same project fits a larger budget, using exactly what the error said
    b = fw.build_firmware(project, out, sram_bytes=512 * 1024)
    assert b.sram_used == needed and not (out / "keep").exists()


@needs_arm
def test_build_sizes(standin_build):
    b = standin_build
    assert b.elf.is_file() and (b.out_dir / "fw.map").is_file()
    assert b.heap == fw.DEFAULT_HEAP_BYTES and b.stack == 8192
    assert b.data + b.bss + b.heap + b.stack <= b.sram_used <= b.data + b.bss + b.heap + b.stack + 32
    assert b.sram_used <= b.sram_budget and b.flash_used == b.text + b.data
    assert b.text > IMAGE_BYTES * HIDDEN  # the frozen weights are in flash
    top = b.sections[".stack"][0] + b.sections[".stack"][1]
    assert top == fw.RAM_ORIGIN + b.sram_used
    if shutil.which("arm-none-eabi-size"):  # Berkeley format agrees: bss there includes heap and stack
        text, data, bss = map(int, subprocess.run(["arm-none-eabi-size", str(b.elf)], capture_output=True, text=True,
                                                  check=True).stdout.splitlines()[1].split()[:3])
        assert (text, data, bss) == (b.text, b.data, b.bss + b.heap + b.stack)


# ---- run --------------------------------------------------------------------------------------------

@needs_qemu
def test_qemu_run_matches_host_bit_for_bit(tmp_path, standin_build):
    xt, yt = standin_data(64, 0)
    xv, yv = standin_data(32, 1)
    samples = fw.write_samples(tmp_path / "s.bin", xt, yt, xv, yv, epochs=2)
    lines = []
    r = fw.run_firmware(standin_build, samples, params_out=tmp_path / "params.bin", count_insns=True, on_line=lines.append)
    assert len(r.epoch_losses) == 2 and r.epoch_losses[1] < r.epoch_losses[0]
    assert r.train_loss == np.float32(r.epoch_losses[1])
    assert r.n_val == 32 and r.val_acc == r.val_correct / 32 > 0.9
    assert len(r.params) == (CLASSES * HIDDEN + CLASSES) * 4 and (tmp_path / "params.bin").read_bytes() == r.params
    assert r.insns > 64 * 2 * 1000 and 0 < r.stack_peak < 8192 - 32 and 0 < r.heap_peak <= fw.DEFAULT_HEAP_BYTES
    assert "val_correct" in "\n".join(lines)

    h = fw.run_host(fw.build_host(standin_build.out_dir.parent / "project", tmp_path / "host"), samples, params_out=True)
    assert h.params == r.params and h.train_loss_bits == r.train_loss_bits and h.epoch_losses == r.epoch_losses
    assert h.val_correct == r.val_correct

    n = fw.insns_per_step(standin_build, xt, yt, k=8)
    assert n.insns_2k > n.insns_k and 2000 < n.per_item < 50000


@needs_qemu
def test_firmware_errors_are_reported(tmp_path, standin_build):
    x = np.zeros((2, 1, 4, 4), np.int8)
    samples = fw.write_samples(tmp_path / "s.bin", x, [0, 1], x[:0], [])
    with pytest.raises(EdgewiseError, match=r"exit status 2\):\n(.|\n)*16 bytes per image, the model takes 64"):
        fw.run_firmware(standin_build, samples)


@needs_qemu
def test_stack_overflow_is_caught(tmp_path):
    # 300-byte frames step over the 32-byte MPU guard; the painted-memory check still sees it.
    project = write_standin(
        tmp_path / "p",
        extra="static int deep(int n) { volatile char pad[300]; pad[0] = (char)n; return n ? deep(n - 1) + pad[0] : 0; }",
        step="if (label == 1) (void)deep(40);",
    )
    b = fw.build_firmware(project, tmp_path / "fw")
    xt, yt = standin_data(8, 0)
    samples = fw.write_samples(tmp_path / "s.bin", xt, yt, xt[:0], yt[:0])
    with pytest.raises(EdgewiseError, match="stack overflow"):
        fw.run_firmware(b, samples)
    b = fw.build_firmware(project, tmp_path / "fw", stack_bytes=32 * 1024)
    assert fw.run_firmware(b, samples).stack_peak > 12000
