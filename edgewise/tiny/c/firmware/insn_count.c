/* edgewise tiny firmware: a QEMU TCG plugin that counts the guest instructions executed.
 *
 *   gcc -shared -fPIC -O2 insn_count.c -o libinsn_count.so
 *   qemu-system-arm ... -plugin ./libinsn_count.so,out=insns.txt[,mode=tb]
 *
 * At exit it writes "insns = N" to the file given as out=PATH, or through qemu_plugin_outs (QEMU's
 * log, which needs -d plugin) when no out= is given.
 *
 * mode=insn (default): an inline counter increment on every instruction, exact.
 * mode=tb: one inline add of the block's length when a translation block starts, a little faster,
 *          but it counts a whole block even when an exception or a semihosting call leaves it early.
 *
 * qemu-plugin.h is not packaged on Debian, so the few declarations used are written out below from
 * QEMU's documented plugin API (API version 1, as in QEMU 7.x; the guest has one vCPU, so the plain
 * counter needs no per-vCPU scoreboard).
 */
#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define EW_PLUGIN_EXPORT __attribute__((visibility("default")))

/* ---- the subset of QEMU's plugin API used here ---- */
typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t; /* only passed through, never read */
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 = 0 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn, enum qemu_plugin_op op, void *ptr,
                                                uint64_t imm);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
void qemu_plugin_outs(const char *string);

EW_PLUGIN_EXPORT int qemu_plugin_version = 1;
/* ---- end of the API subset ---- */

static uint64_t insn_count;
static int per_block;
static char out_path[4096];

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb), i;
    (void)id;
    if (per_block) {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insn_count, n);
        return;
    }
    for (i = 0; i < n; i++)
        qemu_plugin_register_vcpu_insn_exec_inline(qemu_plugin_tb_get_insn(tb, i), QEMU_PLUGIN_INLINE_ADD_U64,
                                                   &insn_count, 1);
}

static void report_at_exit(qemu_plugin_id_t id, void *userdata)
{
    char line[64];
    (void)id;
    (void)userdata;
    snprintf(line, sizeof line, "insns = %" PRIu64 "\n", insn_count);
    if (out_path[0]) {
        FILE *f = fopen(out_path, "w");
        if (f) {
            fputs(line, f);
            fclose(f);
            return;
        }
        fprintf(stderr, "insn_count: cannot write %s\n", out_path);
    }
    qemu_plugin_outs(line);
}

EW_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    int i;
    (void)info;
    for (i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            if (strlen(argv[i] + 4) >= sizeof out_path) return 1;
            strcpy(out_path, argv[i] + 4);
        } else if (strcmp(argv[i], "mode=tb") == 0) {
            per_block = 1;
        } else if (strcmp(argv[i], "mode=insn") == 0) {
            per_block = 0;
        } else {
            fprintf(stderr, "insn_count: unknown argument %s (expected out=PATH, mode=insn|tb)\n", argv[i]);
            return 1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, report_at_exit, NULL);
    return 0;
}
