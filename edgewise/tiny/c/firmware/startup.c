/* edgewise tiny firmware: bare-metal start-up for a Cortex-M7 (QEMU's mps2-an500).
 *
 * Linked with -nostartfiles: newlib's own rdimon-crt0 is NOT used, because it asks the debugger
 * (semihosting SYS_HEAPINFO) where to put the stack and heap, and QEMU answers with addresses of
 * its own choosing, outside the RAM budget that link.ld enforces. Instead this file provides:
 *
 *   - the vector table (initial SP = __stack_top, the top of the stack reservation, which is the
 *     end of the RAM the program uses: link.ld puts the stack last; Reset_Handler; fault handlers);
 *   - Reset_Handler: enable the FPU, copy .data from flash, zero .bss, paint the heap and stack
 *     (for the peak measurement), guard the stack's bottom with the MPU, open the semihosting stdio
 *     handles, run the C constructors, read argv from the debugger (SYS_GET_CMDLINE), call main
 *     and exit(main's return code);
 *   - a stack guard: the lowest EW_GUARD_BYTES of the stack reservation are a no-access MPU
 *     region, so a stack overflow faults (and is reported) instead of silently overwriting the
 *     heap and .bss below it;
 *   - _sbrk confined to the linker's .heap reservation (newlib-nano's malloc, used only by stdio);
 *   - fault handlers that print the fault and the stacked PC over semihosting and exit nonzero;
 *   - ew_fw_stack_peak / ew_fw_heap_peak: the most stack and heap the program used, in bytes.
 *
 * Symbols from link.ld: __data_load (LMA of .data in flash), __data_start/__data_end,
 * __bss_start__/__bss_end__, __heap_start/__heap_end, __stack_limit/__stack_top.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

extern uint32_t __data_load[], __data_start[], __data_end[];
extern uint32_t __bss_start__[], __bss_end__[];
extern char __heap_start[], __heap_end[];
extern uint32_t __stack_limit[], __stack_top[];

extern int main(int argc, char **argv);
extern void initialise_monitor_handles(void); /* librdimon: opens :tt as stdin/stdout/stderr */
extern void __libc_init_array(void);

#define STACK_PAINT 0xC5C5C5C5u
#define EW_GUARD_BYTES 32u /* the smallest MPU region; link.ld aligns __stack_limit to it */
#define EW_MAX_ARGS 8
#define EW_CMDLINE_BYTES 128 /* firmware.py passes short names: "fw samples.bin params.bin" */

/* ---- semihosting (ARM semihosting v2, M-profile: BKPT 0xAB) ---------------------------------- */

#define SYS_WRITE0 0x04
#define SYS_GET_CMDLINE 0x15
#define SYS_EXIT 0x18
#define ADP_Stopped_RunTimeErrorUnknown 0x20023

static int semihost(int op, void *arg)
{
    register int r0 __asm__("r0") = op;
    register void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

static void sh_puts(const char *s) { semihost(SYS_WRITE0, (void *)s); }

static void sh_hex(const char *label, uint32_t v)
{
    char buf[24];
    int i = 0;
    const char *hex = "0123456789abcdef";
    sh_puts(label);
    buf[i++] = '0';
    buf[i++] = 'x';
    for (int s = 28; s >= 0; s -= 4) buf[i++] = hex[(v >> s) & 15u];
    buf[i++] = ' ';
    buf[i] = 0;
    sh_puts(buf);
}

static void __attribute__((noreturn)) sh_fail(void)
{
    /* A 32-bit SYS_EXIT takes the reason code itself in r1; any reason but ApplicationExit makes
     * QEMU exit with status 1. */
    semihost(SYS_EXIT, (void *)ADP_Stopped_RunTimeErrorUnknown);
    for (;;) {
    }
}

/* ---- faults -------------------------------------------------------------------------------- */

#define SCB_CFSR (*(volatile uint32_t *)0xE000ED28u)
#define SCB_HFSR (*(volatile uint32_t *)0xE000ED2Cu)
#define SCB_MMFAR (*(volatile uint32_t *)0xE000ED34u)
#define SCB_BFAR (*(volatile uint32_t *)0xE000ED38u)
#define SCB_ICSR (*(volatile uint32_t *)0xE000ED04u)

/* Called with the exception stack frame (r0-r3, r12, lr, pc, xpsr). */
void __attribute__((used, noreturn)) ew_fault_report(const uint32_t *frame)
{
    static const char *const names[16] = {"?", "Reset", "NMI", "HardFault", "MemManage", "BusFault",
                                          "UsageFault", "?", "?", "?", "?", "SVCall", "DebugMon",
                                          "?", "PendSV", "SysTick"};
    uint32_t exc = SCB_ICSR & 0x1FFu;
    sh_puts("\nfirmware fault: ");
    sh_puts(exc < 16 ? names[exc] : "IRQ");
    sh_puts(" ");
    sh_hex("exception=", exc);
    sh_hex("pc=", frame[6]);
    sh_hex("lr=", frame[5]);
    sh_hex("sp=", (uint32_t)(uintptr_t)frame);
    sh_hex("CFSR=", SCB_CFSR);
    sh_hex("HFSR=", SCB_HFSR);
    sh_hex("MMFAR=", SCB_MMFAR);
    sh_hex("BFAR=", SCB_BFAR);
    if ((SCB_CFSR & 0x10u) /* MSTKERR */ || (uintptr_t)frame < (uintptr_t)__stack_limit + EW_GUARD_BYTES + 64 ||
        ((SCB_CFSR & 0x80u) /* MMARVALID */ && SCB_MMFAR - (uint32_t)(uintptr_t)__stack_limit < EW_GUARD_BYTES))
        sh_puts("\nstack overflow: the program needs more stack than its reservation; build with a larger stack_bytes");
    sh_puts("\n");
    sh_fail();
}

/* Every fault and unexpected interrupt: pass the stacked frame (MSP or PSP per EXC_RETURN bit 2)
 * to ew_fault_report, after turning the MPU off (the frame may lie in the stack guard) and moving
 * the stack to the top of its reservation (the fault may be a stack overflow; we never return). */
void __attribute__((naked)) Fault_Handler(void)
{
    __asm__ volatile(
        "tst lr, #4\n"
        "ite eq\n"
        "mrseq r0, msp\n"
        "mrsne r0, psp\n"
        "ldr r1, =0xE000ED94\n" /* MPU_CTRL = 0 */
        "movs r2, #0\n"
        "str r2, [r1]\n"
        "dsb\n"
        "isb\n"
        "ldr r1, =__stack_top\n"
        "mov sp, r1\n"
        "b ew_fault_report\n");
}

/* ---- heap: newlib-nano's malloc calls _sbrk; keep it inside the linker's .heap reservation ---- */

static char *heap_brk;
static char *heap_peak;

void *_sbrk(ptrdiff_t incr)
{
    char *prev;
    if (!heap_brk) heap_brk = heap_peak = __heap_start;
    if (incr > __heap_end - heap_brk || incr < __heap_start - heap_brk) {
        errno = ENOMEM;
        return (void *)-1;
    }
    prev = heap_brk;
    heap_brk += incr;
    if (heap_brk > heap_peak) heap_peak = heap_brk;
    return prev;
}

unsigned ew_fw_heap_peak(void) { return heap_peak ? (unsigned)(heap_peak - __heap_start) : 0u; }

/* The deepest the stack has reached, in bytes below __stack_top: the lowest word no longer painted,
 * searched from the heap's high-water mark up (skipping the guard, which cannot be read). A result
 * above __stack_size - EW_GUARD_BYTES means the stack overflowed: a frame larger than the guard can
 * step over it into the free top of the heap reservation, where this still sees it. */
unsigned ew_fw_stack_peak(void)
{
    const uint32_t *guard = __stack_limit, *above_guard = __stack_limit + EW_GUARD_BYTES / 4;
    const uint32_t *p = (const uint32_t *)(((uintptr_t)(heap_peak ? heap_peak : __heap_start) + 3u) & ~(uintptr_t)3u);
    while (p < __stack_top && (p >= guard && p < above_guard ? 1 : *p == STACK_PAINT))
        p = (p == guard) ? above_guard : p + 1;
    return (unsigned)((uintptr_t)__stack_top - (uintptr_t)p);
}

/* newlib's __libc_init_array / exit call _init / _fini, which crti.o would provide; with
 * -nostartfiles there is no crti.o, and all constructors run from .init_array anyway. */
void _init(void) {}
void _fini(void) {}

/* ---- argv from the debugger: QEMU's -semihosting-config arg=...,arg=... joined by spaces ---- */

static char cmdline[EW_CMDLINE_BYTES];
static char *argv_buf[EW_MAX_ARGS + 1];

static int read_args(void)
{
    struct {
        char *buf;
        int len;
    } block = {cmdline, (int)sizeof cmdline - 1};
    int argc = 0;
    char *p = cmdline;
    if (semihost(SYS_GET_CMDLINE, &block) != 0) return 0;
    cmdline[block.len < 0 ? 0 : block.len] = 0;
    while (*p && argc < EW_MAX_ARGS) {
        while (*p == ' ') *p++ = 0;
        if (!*p) break;
        argv_buf[argc++] = p;
        while (*p && *p != ' ') p++;
    }
    while (*p == ' ') *p++ = 0;
    argv_buf[argc] = 0;
    return argc;
}

/* ---- reset --------------------------------------------------------------------------------- */

#define SCB_CPACR (*(volatile uint32_t *)0xE000ED88u)
#define SCB_SHCSR (*(volatile uint32_t *)0xE000ED24u)
#define MPU_CTRL (*(volatile uint32_t *)0xE000ED94u)
#define MPU_RNR (*(volatile uint32_t *)0xE000ED98u)
#define MPU_RBAR (*(volatile uint32_t *)0xE000ED9Cu)
#define MPU_RASR (*(volatile uint32_t *)0xE000EDA0u)

/* MPU region 0: EW_GUARD_BYTES at __stack_limit, no access (AP = 0), execute never; elsewhere the
 * default memory map (PRIVDEFENA). MemManage, BusFault and UsageFault get reported as themselves
 * instead of escalating to HardFault. */
static void guard_stack(void)
{
    MPU_RNR = 0;
    MPU_RBAR = (uint32_t)(uintptr_t)__stack_limit;
    MPU_RASR = (1u << 28) /* XN */ | (0u << 24) /* AP: no access */ | ((5u - 1u) << 1) /* 2^5 bytes */ | 1u;
    MPU_CTRL = (1u << 2) /* PRIVDEFENA */ | 1u /* ENABLE */;
    SCB_SHCSR |= (1u << 16) | (1u << 17) | (1u << 18);
    __asm__ volatile("dsb\n isb" ::: "memory");
}

void __attribute__((noreturn)) Reset_Handler(void)
{
    uint32_t *dst, *src, *sp;
    int argc;

    /* FPU first: CP10 and CP11 full access, before any floating-point instruction can run. */
    SCB_CPACR |= (0xFu << 20);
    __asm__ volatile("dsb\n isb" ::: "memory");

    for (src = __data_load, dst = __data_start; dst < __data_end;) *dst++ = *src++;
    for (dst = __bss_start__; dst < __bss_end__;) *dst++ = 0;

    /* Paint the heap and the stack below the current frame (64 bytes of margin) for
     * ew_fw_stack_peak. */
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    for (dst = (uint32_t *)(uintptr_t)__heap_start; dst < sp - 16;) *dst++ = STACK_PAINT;
    guard_stack();

    initialise_monitor_handles();
    __libc_init_array();
    argc = read_args();
    exit(main(argc, argv_buf));
}

/* ---- vector table -------------------------------------------------------------------------- */

#define EW_N_IRQS 32 /* the mps2-an500's external interrupts; none is enabled */

typedef void (*ew_vector)(void);

__attribute__((section(".isr_vector"), used)) const ew_vector ew_vectors[16 + EW_N_IRQS] = {
    [0] = (ew_vector)(uintptr_t)__stack_top,
    [1] = Reset_Handler,
    [2] = Fault_Handler,  /* NMI */
    [3] = Fault_Handler,  /* HardFault */
    [4] = Fault_Handler,  /* MemManage */
    [5] = Fault_Handler,  /* BusFault */
    [6] = Fault_Handler,  /* UsageFault */
    [11] = Fault_Handler, /* SVCall */
    [12] = Fault_Handler, /* DebugMonitor */
    [14] = Fault_Handler, /* PendSV */
    [15] = Fault_Handler, /* SysTick */
#define EW_IRQ8(n)                                                                              \
    [16 + n] = Fault_Handler, [17 + n] = Fault_Handler, [18 + n] = Fault_Handler,                \
    [19 + n] = Fault_Handler, [20 + n] = Fault_Handler, [21 + n] = Fault_Handler,                \
    [22 + n] = Fault_Handler, [23 + n] = Fault_Handler
    EW_IRQ8(0), EW_IRQ8(8), EW_IRQ8(16), EW_IRQ8(24),
#undef EW_IRQ8
};
