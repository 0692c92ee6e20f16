/* digest: a long deterministic computation over a large memory area.
 *
 * The area (mib MiB at free_start) is cut into LANES lanes. Each round walks every
 * word of a lane, folds it into the lane's running hash and writes the running hash
 * back, so the final digest depends on every byte and every round: any page lost or
 * stale after a restore changes it. Lanes are shared out over the vCPUs
 * (lane % nr_vcpus == cpu), so the digest is the same for any number of vCPUs.
 *
 * args: mib=<MiB, default 1> rounds=<default 8>
 * prints: "digest: ..." header, "round R/N" after each of vCPU 0's rounds, "digest=<hex>"
 * exits with status 0 (1 if the area does not fit). */
#include "cevm_guest.h"

#define LANES 8

static u64 lane_hash[LANES];
static volatile u64 finished_vcpus;

static u64 mix(u64 h, u64 w)
{
    h ^= w;
    h *= 0x100000001b3UL;
    h ^= h >> 29;
    return h;
}

void guest_main(struct boot_info *bi, u64 cpu)
{
    u64 mib = arg_u64(bi, "mib", 1);
    u64 rounds = arg_u64(bi, "rounds", 8);
    u64 ncpu = bi->nr_vcpus;
    u64 *area = (u64 *)bi->free_start;
    u64 words = (mib << 20) / 8;
    u64 lane_words = words / LANES;

    if (cpu == 0) {
        puts("digest: mib=");
        put_dec(mib);
        puts(" rounds=");
        put_dec(rounds);
        puts(" vcpus=");
        put_dec(ncpu);
        puts("\n");
        if (mib == 0 || bi->free_start + (mib << 20) > bi->free_end) {
            puts("digest: area does not fit in guest memory\n");
            guest_exit(1);
        }
    } else if (mib == 0 || bi->free_start + (mib << 20) > bi->free_end) {
        park();
    }

    for (u64 lane = cpu; lane < LANES; lane += ncpu) {
        u64 *p = area + lane * lane_words;
        for (u64 i = 0; i < lane_words; i++)
            p[i] = (lane * lane_words + i) * 0x9e3779b97f4a7c15UL;
        lane_hash[lane] = 0xcbf29ce484222325UL ^ lane;
    }

    for (u64 r = 1; r <= rounds; r++) {
        for (u64 lane = cpu; lane < LANES; lane += ncpu) {
            u64 *p = area + lane * lane_words;
            u64 h = lane_hash[lane];
            for (u64 i = 0; i < lane_words; i++) {
                h = mix(h, p[i] + r);
                p[i] = h;
            }
            lane_hash[lane] = h;
        }
        if (cpu == 0) {
            puts("round ");
            put_dec(r);
            puts("/");
            put_dec(rounds);
            puts("\n");
        }
    }

    __atomic_add_fetch(&finished_vcpus, 1, __ATOMIC_SEQ_CST);
    if (cpu != 0)
        park();
    while (__atomic_load_n(&finished_vcpus, __ATOMIC_SEQ_CST) < ncpu)
        cpu_relax();

    u64 d = 0x84222325cbf29ce4UL ^ rounds;
    for (u64 lane = 0; lane < LANES; lane++)
        d = mix(d, lane_hash[lane]);
    puts("digest=");
    put_hex(d, 16);
    puts("\n");
    guest_exit(0);
}
