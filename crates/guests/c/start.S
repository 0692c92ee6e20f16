/* Entry of every built-in guest. The VMM starts each vCPU here in 64-bit mode with
 * rdi = &boot_info, rsi = vCPU index, rsp = top of that vCPU's own stack (16-byte aligned). */
    .section .text.start, "ax"
    .globl _start
_start:
    call guest_main
1:  cli
    hlt
    jmp 1b
