/* edgewise tiny firmware: train and evaluate a generated model on samples read over semihosting.
 *
 *   fw.elf SAMPLES [PARAMS_OUT]        (argv from QEMU's -semihosting-config arg=...)
 *
 * SAMPLES (little endian, written by edgewise.tiny.firmware.write_samples):
 *   "EWDS", u32 version = 1, u32 n_train, u32 n_val, u32 image_bytes, u32 epochs,
 *   n_train records of (int8 image[image_bytes], int32 label), then n_val records likewise.
 * The samples stay in the file: each is read when needed into the one image buffer in RAM.
 *
 * Output, one item per line (parsed by edgewise.tiny.firmware.run_firmware):
 *   epoch E: loss L                      mean training loss of epoch E (1-based)
 *   train_loss_bits = 0xXXXXXXXX         the last epoch's mean loss, as float bits
 *   val_acc = A                          correct / n_val (0 when n_val is 0)
 *   val_correct = K n_val = N
 *   params_bytes = B                     when PARAMS_OUT is given: the trained parameters, in
 *                                        ew_param_at order, raw bytes, written to PARAMS_OUT
 *   stack_peak = S heap_peak = H         (firmware only, also after an error) bytes of stack and
 *                                        heap used at most
 * The mean loss of an epoch is the float32 of the sequential double sum of the step losses,
 * divided by n_train: mean = (float)(((double)l_1 + l_2 + ...) / n_train).
 *
 * Exit codes: 0 ok, 2 bad samples file (header or label), 3 cannot open a file, 4 short read,
 * 5 cannot write PARAMS_OUT.
 *
 * Plain C99 and stdio only, so the same file also builds for the host (edgewise.tiny.firmware.
 * build_host) to compare the two runs bit for bit.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "ew_model.h"

#if defined(__arm__) && !defined(__linux__)
#define EW_BARE_METAL 1
unsigned ew_fw_stack_peak(void);
unsigned ew_fw_heap_peak(void);
#endif

#define EWDS_HEADER_BYTES 24

/* The one image buffer, aligned for word-wise reads. */
static union {
    int8_t b[EW_IMAGE_BYTES];
    uint32_t align;
} image;

static uint32_t u32le(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* Reads one (image, label) record into `image` and *label; returns 0, or an exit code after
 * printing why not. */
static int read_record(FILE *f, int *label)
{
    unsigned char lb[4];
    int32_t v;
    if (fread(image.b, 1, EW_IMAGE_BYTES, f) != EW_IMAGE_BYTES || fread(lb, 1, 4, f) != 4) {
        printf("error: samples file ended early\n");
        return 4;
    }
    v = (int32_t)u32le(lb);
    if (v < 0 || v >= EW_N_CLASSES) {
        printf("error: label %ld out of range 0..%d\n", (long)v, EW_N_CLASSES - 1);
        return 2;
    }
    *label = (int)v;
    return 0;
}

static int dtype_bytes(int dtype)
{
    switch (dtype) {
    case 0: return 1;  /* int8 */
    case 1: return 4;  /* int32 */
    case 2: return 4;  /* float32 */
    case 3: return 2;  /* int16 */
    default: return 0;
    }
}

static int write_params(const char *path)
{
    FILE *out = fopen(path, "wb");
    long total = 0;
    int i;
    if (!out) {
        printf("error: cannot open %s for writing\n", path);
        return 3;
    }
    for (i = 0; i < ew_n_params(); i++) {
        const ew_param *p = ew_param_at(i);
        size_t n = (size_t)p->numel * (size_t)dtype_bytes(p->dtype);
        if (dtype_bytes(p->dtype) == 0 || fwrite(p->data, 1, n, out) != n) {
            printf("error: cannot write parameter %s to %s\n", p->name, path);
            fclose(out);
            return 5;
        }
        total += (long)n;
    }
    if (fclose(out) != 0) {
        printf("error: cannot write %s\n", path);
        return 5;
    }
    printf("params_bytes = %ld\n", total);
    return 0;
}

static int run(int argc, char **argv)
{
    unsigned char h[EWDS_HEADER_BYTES];
    uint32_t n_train, n_val, image_bytes, epochs, e, i, correct = 0;
    long record_bytes;
    float mean = 0.0f;
    FILE *f;

    if (argc < 2) {
        printf("usage: %s SAMPLES [PARAMS_OUT]\n", argc > 0 ? argv[0] : "fw");
        return 2;
    }
    f = fopen(argv[1], "rb");
    if (!f) {
        printf("error: cannot open %s\n", argv[1]);
        return 3;
    }
    if (fread(h, 1, sizeof h, f) != sizeof h || memcmp(h, "EWDS", 4) != 0 || u32le(h + 4) != 1) {
        printf("error: %s is not an EWDS version 1 samples file\n", argv[1]);
        return 2;
    }
    n_train = u32le(h + 8);
    n_val = u32le(h + 12);
    image_bytes = u32le(h + 16);
    epochs = u32le(h + 20);
    if (image_bytes != EW_IMAGE_BYTES) {
        printf("error: samples have %lu bytes per image, the model takes %d\n", (unsigned long)image_bytes,
               EW_IMAGE_BYTES);
        return 2;
    }
    record_bytes = (long)EW_IMAGE_BYTES + 4;
    printf("samples: n_train = %lu n_val = %lu image_bytes = %lu epochs = %lu\n", (unsigned long)n_train,
           (unsigned long)n_val, (unsigned long)image_bytes, (unsigned long)epochs);

    ew_init();
    for (e = 0; e < epochs; e++) {
        double sum = 0.0;
        if (fseek(f, EWDS_HEADER_BYTES, SEEK_SET) != 0) {
            printf("error: cannot seek in %s\n", argv[1]);
            return 4;
        }
        for (i = 0; i < n_train; i++) {
            int label, rc = read_record(f, &label);
            if (rc) return rc;
            sum += (double)ew_train_step(image.b, label);
        }
        mean = n_train ? (float)(sum / (double)n_train) : 0.0f;
        printf("epoch %lu: loss %.9g\n", (unsigned long)(e + 1), (double)mean);
    }
    if (epochs > 0) {
        uint32_t bits;
        memcpy(&bits, &mean, 4);
        printf("train_loss_bits = 0x%08lx\n", (unsigned long)bits);
    }

    if (n_val > 0 && fseek(f, EWDS_HEADER_BYTES + record_bytes * (long)n_train, SEEK_SET) != 0) {
        printf("error: cannot seek in %s\n", argv[1]);
        return 4;
    }
    for (i = 0; i < n_val; i++) {
        int label, rc = read_record(f, &label);
        if (rc) return rc;
        correct += (uint32_t)(ew_infer(image.b) == label);
    }
    fclose(f);
    printf("val_acc = %.6f\n", n_val ? (double)correct / (double)n_val : 0.0);
    printf("val_correct = %lu n_val = %lu\n", (unsigned long)correct, (unsigned long)n_val);

    return argc >= 3 ? write_params(argv[2]) : 0;
}

int main(int argc, char **argv)
{
    int rc = run(argc, argv);
#ifdef EW_BARE_METAL
    /* Also after an error: a stack that reached its reservation explains corrupted data. */
    printf("stack_peak = %u heap_peak = %u\n", ew_fw_stack_peak(), ew_fw_heap_peak());
#endif
    return rc;
}
