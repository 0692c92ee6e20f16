/* hello: the smallest guest. Every vCPU checks in; vCPU 0 prints what it was given and
 * exits with status `code`. With crash=1, vCPU 0 instead raises an exception
 * while the IDT is empty: a triple fault, which the VMM must report as a guest shutdown.
 *
 * args: code=<exit status, default 0> crash=<0|1> */
#include "cevm_guest.h"

static volatile u64 checked_in;

void guest_main(struct boot_info *bi, u64 cpu)
{
    __atomic_add_fetch(&checked_in, 1, __ATOMIC_SEQ_CST);
    if (cpu != 0)
        park();
    while (__atomic_load_n(&checked_in, __ATOMIC_SEQ_CST) < bi->nr_vcpus)
        cpu_relax();

    puts("hello from cevm: vcpus=");
    put_dec(bi->nr_vcpus);
    puts(" mem_mib=");
    put_dec(bi->mem_size >> 20);
    puts(" args=\"");
    puts(bi->args);
    puts("\"\n");

    if (arg_u64(bi, "crash", 0)) {
        /* The VMM enters with an empty IDT: the exception cannot be delivered,
         * which escalates to a double and then a triple fault. */
        __asm__ volatile("ud2");
    }
    guest_exit((u32)arg_u64(bi, "code", 0));
}
