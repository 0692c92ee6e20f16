/* dirtier: keeps dirtying a working set of guest memory at a given rate.
 *
 * Writes one 8-byte counter into each 4 KiB page of a `mib` MiB working set, page
 * after page, wrapping around, paced to `rate` pages per second by the TSC (0 = as
 * fast as the vCPU goes), and prints the pages/s achieved each second.
 *
 * args: mib=<working set, default 16> rate=<pages/s, default 0> seconds=<default 10 (0 with work=), 0 = forever>
 *       fill=1: first write every page of the working set once, as fast as it goes
 *       idle=1: after the fill, halt for good (an idle guest whose memory holds data)
 *       data=<MiB>: fill this much memory (at least the working set) with data first
 *       work=<pages>: a job of fixed size: exit 0 once this many pages were written.
 *                     Paced (rate) time lost to a pause is not made up afterwards,
 *                     so a pause delays the end by its length, as it would a job.
 * prints: "dirtier: ..." header, "dirtier: filled pages=<n>" after a fill,
 *         "dirtier: t=<s>s pages/s=<n> total=<n>" each second,
 *         "dirtier: done pages=<n>" at the end; exits 0 (1 on bad arguments). */
#include "cevm_guest.h"

#define PAGE 4096UL
#define CHECK_EVERY 16

void guest_main(struct boot_info *bi, u64 cpu)
{
    if (cpu != 0)
        park();

    u64 mib = arg_u64(bi, "mib", 16);
    u64 rate = arg_u64(bi, "rate", 0);
    u64 work = arg_u64(bi, "work", 0);
    /* A job of fixed size (work=) runs until its work is done. */
    u64 seconds = arg_u64(bi, "seconds", work ? 0 : 10);
    u64 tsc_hz = (u64)bi->tsc_khz * 1000;
    u8 *area = (u8 *)bi->free_start;
    u64 pages = (mib << 20) / PAGE;

    puts("dirtier: mib=");
    put_dec(mib);
    puts(" rate=");
    put_dec(rate);
    puts(" seconds=");
    put_dec(seconds);
    puts("\n");
    if (pages == 0 || bi->free_start + (mib << 20) > bi->free_end) {
        puts("dirtier: working set does not fit in guest memory\n");
        guest_exit(1);
    }
    if (tsc_hz == 0) {
        puts("dirtier: TSC frequency unknown\n");
        guest_exit(1);
    }

    u64 data = arg_u64(bi, "data", 0);
    if (data && bi->free_start + (data << 20) > bi->free_end) {
        puts("dirtier: data does not fit in guest memory\n");
        guest_exit(1);
    }
    if (arg_u64(bi, "fill", 0) || arg_u64(bi, "idle", 0) || data) {
        u64 filled = (data << 20) / PAGE > pages ? (data << 20) / PAGE : pages;
        for (u64 p = 0; p < filled; p++)
            *(volatile u64 *)(area + p * PAGE) = p + 1;
        puts("dirtier: filled pages=");
        put_dec(filled);
        puts("\n");
        if (arg_u64(bi, "idle", 0))
            park();
    }

    u64 t0 = rdtsc();
    u64 next_report = t0 + tsc_hz;
    u64 total = 0, at_last_report = 0, elapsed_s = 0, page = 0;
    for (;;) {
        for (int k = 0; k < CHECK_EVERY; k++) {
            *(volatile u64 *)(area + page * PAGE) = ++total;
            if (++page == pages)
                page = 0;
        }
        u64 now = rdtsc();
        if (work && total >= work) {
            puts("dirtier: done pages=");
            put_dec(total);
            puts("\n");
            guest_exit(0);
        }
        if (rate && work) {
            /* Behind schedule by more than 1 ms (a pause): forget the lost time. */
            u64 due = t0 + total * tsc_hz / rate;
            if (now > due + tsc_hz / 1000)
                t0 += now - due;
        }
        if (rate) {
            /* Wait until `total` pages are due at `rate` pages/s since t0. */
            u64 due = t0 + total * tsc_hz / rate;
            while (now < due && now < next_report) {
                cpu_relax();
                now = rdtsc();
            }
        }
        if (now >= next_report) {
            elapsed_s++;
            next_report += tsc_hz;
            puts("dirtier: t=");
            put_dec(elapsed_s);
            puts("s pages/s=");
            put_dec(total - at_last_report);
            puts(" total=");
            put_dec(total);
            puts("\n");
            at_last_report = total;
            if (seconds && elapsed_s >= seconds) {
                puts("dirtier: done pages=");
                put_dec(total);
                puts("\n");
                guest_exit(0);
            }
        }
    }
}
