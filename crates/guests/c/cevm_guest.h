/* The ABI between cevm and its built-in freestanding guests, and a few helpers.
 * Must match crates/vmm/src/layout.rs and crates/vmm/src/boot.rs. */
#ifndef CEVM_GUEST_H
#define CEVM_GUEST_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define BOOT_INFO_MAGIC 0x544f4f424d564543UL /* "CEVMBOOT" */
#define COM1 0x3f8
#define EXIT_PORT 0xf4

struct boot_info {
    u64 magic;
    u64 mem_size;   /* bytes of guest RAM */
    u64 free_start; /* first guest-physical byte a guest may use freely */
    u64 free_end;   /* end of identity-mapped free RAM usable by the guest */
    u32 nr_vcpus;
    u32 tsc_khz;    /* 0 if unknown */
    char args[256]; /* NUL-terminated "key=value key=value" */
};

void guest_main(struct boot_info *bi, u64 cpu);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

void putc(char c);
void puts(const char *s);
void put_dec(u64 v);
void put_hex(u64 v, int digits);
/* Ends the VM with `status` through the exit port; never returns. */
void guest_exit(u32 status) __attribute__((noreturn));
/* Stops this vCPU for good (interrupts off, hlt). */
void park(void) __attribute__((noreturn));
/* Reads "key=<decimal>" from the boot arguments, or `def` when absent. */
u64 arg_u64(const struct boot_info *bi, const char *key, u64 def);
void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);

#endif
