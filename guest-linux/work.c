/* cevm-work: the benchmarks' workload inside the Linux guest, the same program
 * under cevm and under QEMU so that both carry exactly the same load.
 *
 *   cevm-work FILL_MIB WS_MIB RATE HB_MS
 *
 * Fills FILL_MIB MiB of its memory with non-zero data (every byte), then keeps
 * dirtying the first WS_MIB MiB of it (the working set, wrapping around), one
 * 8-byte write per 4 KiB page, at RATE pages per second (0: idle, no writes;
 * -1: as fast as the vCPU goes). Pacing is by CLOCK_MONOTONIC; time lost to a
 * pause longer than 1 ms is not made up, so a pause shows as missing pages.
 *
 * Every HB_MS ms it prints one line "hb SEQ PAGES" (sequence number, pages
 * written so far) in one write(2) to its stdout, the serial console: the host
 * stamps each line when it arrives, so gaps in the stream are the guest's
 * pauses seen from outside (the guest's own clock does not see them: its VMM
 * restores the clock across a pause), and PAGES over those stamps is the rate
 * the guest achieved around a checkpoint.
 *
 * Written by hand in C (static, no libraries beyond libc): a busybox loop
 * cannot pace page writes or print at a fixed beat. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void say(const char *s)
{
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(1, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        say("cevm-work: usage: cevm-work FILL_MIB WS_MIB RATE HB_MS\n");
        return 2;
    }
    uint64_t fill_mib = strtoull(argv[1], NULL, 10);
    uint64_t ws_mib = strtoull(argv[2], NULL, 10);
    long long rate = strtoll(argv[3], NULL, 10);
    uint64_t hb_ms = strtoull(argv[4], NULL, 10);
    if (ws_mib > fill_mib)
        fill_mib = ws_mib;
    if (hb_ms == 0 || (rate != 0 && ws_mib == 0)) {
        say("cevm-work: HB_MS must be > 0, and WS_MIB > 0 when RATE is not 0\n");
        return 2;
    }
    uint64_t bytes = fill_mib << 20;
    uint8_t *area = NULL;
    if (bytes) {
        area = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (area == MAP_FAILED) {
            say("cevm-work: cannot map the memory\n");
            return 1;
        }
        /* Every byte non-zero, and no two pages alike. */
        for (uint64_t p = 0; p < bytes / PAGE; p++) {
            memset(area + p * PAGE, 0x5a, PAGE);
            *(uint64_t *)(area + p * PAGE) = p + 1;
        }
    }
    char line[96];
    snprintf(line, sizeof line, "cevm-work: filled %llu MiB, working set %llu MiB, rate %lld pages/s, beat %llu ms\n",
             (unsigned long long)fill_mib, (unsigned long long)ws_mib, rate, (unsigned long long)hb_ms);
    say(line);

    uint64_t ws_pages = (ws_mib << 20) / PAGE;
    uint64_t beat = hb_ms * 1000000ull;
    uint64_t t0 = now_ns(), next_hb = t0 + beat, seq = 0, total = 0, page = 0;
    for (;;) {
        uint64_t now = now_ns();
        if (rate > 0) {
            uint64_t due = t0 + total * 1000000000ull / (uint64_t)rate;
            /* Behind by more than 1 ms (a pause): forget the lost time. */
            if (now > due + 1000000ull)
                t0 += now - due;
        }
        /* Write what is due (everything, flat out) until the next beat. */
        while (rate != 0 && now < next_hb) {
            if (rate > 0 && now < t0 + total * 1000000000ull / (uint64_t)rate)
                break;
            for (int k = 0; k < 16; k++) {
                *(volatile uint64_t *)(area + page * PAGE + 8) = ++total;
                if (++page == ws_pages)
                    page = 0;
            }
            now = now_ns();
        }
        if (now >= next_hb) {
            snprintf(line, sizeof line, "hb %llu %llu\n", (unsigned long long)++seq, (unsigned long long)total);
            say(line);
            next_hb += beat;
            /* Asleep longer than a beat (a pause): beat on from now. */
            if (next_hb < now)
                next_hb = now + beat;
            continue;
        }
        /* Nothing due: sleep until the next page or beat. */
        uint64_t until = next_hb;
        if (rate > 0) {
            uint64_t due = t0 + total * 1000000000ull / (uint64_t)rate;
            if (due < until)
                until = due;
        }
        if (until > now) {
            uint64_t d = until - now;
            /* Idle: sleep to the beat; otherwise wake at least every 1 ms. */
            if (rate != 0 && d > 1000000ull)
                d = 1000000ull;
            struct timespec ts = {(time_t)(d / 1000000000ull), (long)(d % 1000000000ull)};
            nanosleep(&ts, NULL);
        }
    }
}
