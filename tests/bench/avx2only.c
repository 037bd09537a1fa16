/*
 * avx2only.so: makes a process on an AVX-512 (VNNI) x86-64 CPU see an AVX2 CPU without VNNI, so that
 * ONNX Runtime's MLAS, Rust's `is_x86_feature_detected!` and NumPy choose their AVX2 code paths,
 * which then run natively on the same silicon. For measuring the int8 variant on "AVX2 without
 * VNNI" when no such CPU is at hand (issue 13); see tests/bench/README.md. Not part of the product.
 *
 *   LD_PRELOAD=path/avx2only.so COMMAND...      (tests/bench/avx2only.sh builds and runs it)
 *
 * How: Linux's CPUID faulting (arch_prctl(ARCH_SET_CPUID, 0); the CPU flag `cpuid_fault`) makes
 * every CPUID instruction of this process trap with SIGSEGV. The handler executes CPUID itself
 * (faulting switched off around it), clears the AVX-512, AVX-VNNI and AMX feature bits of leaf 7
 * and steps over the instruction. The setting is inherited by threads and forks and reset by
 * execve, where the preloaded constructor sets it again. What ran before the constructor (the
 * dynamic loader and glibc's own string-function selection) keeps the real features; MLAS's
 * dispatch tables are built later, on first use.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_SET_CPUID
#define ARCH_SET_CPUID 0x1012
#endif

/* Leaf 7, sub-leaf 0. EBX: AVX512F (16), DQ (17), IFMA (21), PF (26), ER (27), CD (28), BW (30),
 * VL (31). ECX: VBMI (1), VBMI2 (6), VNNI (11), BITALG (12), VPOPCNTDQ (14). EDX: 4VNNIW (2),
 * 4FMAPS (3), VP2INTERSECT (8), AMX-BF16 (22), AVX512-FP16 (23), AMX-TILE (24), AMX-INT8 (25). */
static const uint32_t CLEAR_7_0_EBX = (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) |
                                      (1u << 28) | (1u << 30) | (1u << 31);
static const uint32_t CLEAR_7_0_ECX = (1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14);
static const uint32_t CLEAR_7_0_EDX = (1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) |
                                      (1u << 24) | (1u << 25);
/* Leaf 7, sub-leaf 1. EAX: AVX-VNNI (4), AVX512-BF16 (5), AMX-FP16 (21), AVX-IFMA (23).
 * EDX: AVX-VNNI-INT8 (4), AVX-NE-CONVERT (5), AVX10 (19). */
static const uint32_t CLEAR_7_1_EAX = (1u << 4) | (1u << 5) | (1u << 21) | (1u << 23);
static const uint32_t CLEAR_7_1_EDX = (1u << 4) | (1u << 5) | (1u << 19);

static long set_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void on_sigsegv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    /* A CPUID fault arrives as a general-protection fault: si_code SI_KERNEL, RIP at 0F A2. */
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        signal(sig, SIG_DFL); /* a real crash: re-executing the instruction takes the default action */
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    set_faulting(0);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_faulting(1);
    if (leaf == 7 && sub == 0) {
        b &= ~CLEAR_7_0_EBX;
        c &= ~CLEAR_7_0_ECX;
        d &= ~CLEAR_7_0_EDX;
    } else if (leaf == 7 && sub == 1) {
        a &= ~CLEAR_7_1_EAX;
        d &= ~CLEAR_7_1_EDX;
    }
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void avx2only(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsegv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0 || set_faulting(1) != 0) {
        fprintf(stderr, "avx2only.so: this kernel or CPU has no CPUID faulting (flag cpuid_fault); refusing to run\n");
        _exit(97);
    }
}
