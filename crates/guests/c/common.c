/* Serial output, exit port and argument parsing shared by the built-in guests. */
#include "cevm_guest.h"

void putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20)) /* LSR: transmitter holding register empty */
        ;
    outb(COM1, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&buf[i]);
}

void put_hex(u64 v, int digits)
{
    for (int i = digits - 1; i >= 0; i--)
        putc("0123456789abcdef"[(v >> (i * 4)) & 0xf]);
}

void park(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void guest_exit(u32 status)
{
    outl(EXIT_PORT, status);
    park();
}

static int key_at(const char *p, const char *key)
{
    while (*key)
        if (*p++ != *key++)
            return 0;
    return *p == '=';
}

u64 arg_u64(const struct boot_info *bi, const char *key, u64 def)
{
    const char *p = bi->args;
    while (*p) {
        while (*p == ' ')
            p++;
        if (key_at(p, key)) {
            while (*p != '=')
                p++;
            p++;
            u64 v = 0;
            while (*p >= '0' && *p <= '9')
                v = v * 10 + (u64)(*p++ - '0');
            return v;
        }
        while (*p && *p != ' ')
            p++;
    }
    return def;
}

void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}
