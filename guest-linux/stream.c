/* cevm-stream: a TCP stream of a known byte sequence between two Linux guests,
 * checked byte by byte as it arrives, and a watcher of the ARP frames an
 * interface sends and receives (a guest's announcements after a move).
 *
 *   cevm-stream send HOST PORT BYTES [KIB_PER_S]
 *   cevm-stream recv PORT BYTES
 *   cevm-stream arpwatch IFACE
 *   cevm-stream blast HOST PORT BYTES
 *   cevm-stream sink PORT
 *
 * The sequence is a hash chain: 8-byte blocks, each the mix of the one before
 * (splitmix64's step), from a fixed seed, written little-endian. Any byte lost,
 * repeated, reordered or changed anywhere on the way is a mismatch at a known
 * offset; a stream that ends early is a reset.
 *
 * send connects (retrying while the peer is not up yet, up to 120 s), sends
 * BYTES of the sequence paced to KIB_PER_S (0 or absent: as fast as TCP goes;
 * time lost to a pause is not made up), shuts its side down and waits for the
 * receiver to close: then every byte was read and checked. recv accepts one
 * connection, checks every byte against the sequence, wants the sender's end
 * right after BYTES, then closes.
 *
 * Every line goes out in one write(2) to stdout (the serial console):
 * "cevm-guest: sent N MiB" / "cevm-guest: received N MiB" at each MiB,
 * "cevm-guest: stream sent BYTES" / "cevm-guest: stream ok BYTES" at the end;
 * "cevm-guest: stream reset after N bytes (...)" and exit 1 if the connection
 * breaks or ends early; "cevm-guest: stream mismatch at offset N ..." and exit 1
 * for a wrong byte. arpwatch prints one line per ARP frame until killed:
 * "cevm-guest: arp out request 10.0.0.2 52:54:00:... -> 10.0.0.2 gratuitous".
 *
 * blast and sink are the network benchmark's load (`cevm bench net-linux`), an
 * iperf of our own: blast sends BYTES (0: until killed) of a constant buffer as
 * fast as TCP goes, nothing computed per byte; sink accepts one connection and
 * reads until the sender's end, printing "cevm-guest: stall MS ms at N MiB" for
 * every wait of over 20 ms between two reads (on its own clock: the gaps a
 * migration or a checkpoint of the sender leaves in the stream) and at the end
 * "cevm-guest: sink BYTES bytes in MS ms, X MiB/s, longest stall MS ms".
 *
 * Written in C (static, libc only): busybox nc cannot check a stream or say
 * where it broke. */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MIB (1ull << 20)
#define SEED 0x6365766d2d6e6574ull /* "cevm-net" */
#define CHUNK 16384
/* A stall this long (no byte moves either way) ends the stream: a migration or
 * a checkpoint pauses a guest for seconds, not minutes. */
#define STALL_S 120

static void say(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    const char *s = line;
    while (n > 0) {
        ssize_t w = write(1, s, (size_t)n);
        if (w <= 0)
            return;
        s += w;
        n -= (int)w;
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t d)
{
    struct timespec ts = {(time_t)(d / 1000000000ull), (long)(d % 1000000000ull)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* The sequence: byte `pos` is byte pos % 8 of block pos / 8. */
struct chain {
    uint64_t block;
    unsigned used; /* bytes of `block` already handed out */
};

static uint64_t mix(uint64_t x)
{
    uint64_t z = x + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void chain_init(struct chain *c)
{
    c->block = mix(SEED);
    c->used = 0;
}

static uint8_t chain_next(struct chain *c)
{
    if (c->used == 8) {
        c->block = mix(c->block);
        c->used = 0;
    }
    return (uint8_t)(c->block >> (8 * c->used++));
}

static void set_timeouts(int fd)
{
    struct timeval tv = {STALL_S, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static const char *why(int e)
{
    return e == EAGAIN ? "no progress for 120 s" : strerror(e);
}

/* A TCP connection to HOST:PORT, retrying while the peer is not up yet (up to
 * 120 s); -2 for a malformed address, -1 when it cannot connect. */
static int connect_to(const char *host, int port)
{
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &to.sin_addr) != 1) {
        say("cevm-guest: %s is not an IPv4 address", host);
        return -2;
    }
    int fd = -1, attempts = 0, last = 0;
    uint64_t t0 = now_ns();
    for (;;) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            say("cevm-guest: socket: %s", strerror(errno));
            return -1;
        }
        attempts++;
        if (connect(fd, (struct sockaddr *)&to, sizeof to) == 0)
            break;
        int e = errno;
        close(fd);
        if (e != last)
            say("cevm-guest: connecting to %s:%d: %s (retrying)", host, port, strerror(e));
        last = e;
        if (now_ns() - t0 > 120 * 1000000000ull || !(e == ECONNREFUSED || e == EHOSTUNREACH || e == ENETUNREACH ||
                                                     e == ETIMEDOUT || e == EINTR)) {
            say("cevm-guest: cannot connect to %s:%d after %d attempts: %s", host, port, attempts, strerror(e));
            return -1;
        }
        sleep_ns(500000000ull);
    }
    set_timeouts(fd);
    say("cevm-guest: connected to %s:%d after %d attempts", host, port, attempts);
    return fd;
}

static int do_send(const char *host, int port, uint64_t bytes, uint64_t kib_s)
{
    int fd = connect_to(host, port);
    if (fd < 0)
        return fd == -2 ? 2 : 1;
    say("cevm-guest: sending %llu bytes at %llu KiB/s", (unsigned long long)bytes, (unsigned long long)kib_s);

    static uint8_t buf[CHUNK];
    struct chain c;
    chain_init(&c);
    uint64_t sent = 0, start = now_ns();
    while (sent < bytes) {
        if (kib_s > 0) {
            uint64_t due = start + sent * 1000000000ull / (kib_s * 1024);
            uint64_t now = now_ns();
            if (now < due)
                sleep_ns(due - now);
            else if (now > due + 200000000ull)
                start += now - due; /* behind (a pause, a stall): no burst to catch up */
        }
        size_t n = bytes - sent < CHUNK ? (size_t)(bytes - sent) : CHUNK;
        for (size_t i = 0; i < n; i++)
            buf[i] = chain_next(&c);
        size_t off = 0;
        while (off < n) {
            ssize_t w = send(fd, buf + off, n - off, MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                say("cevm-guest: stream reset after %llu bytes (send: %s)", (unsigned long long)(sent + off),
                    w < 0 ? why(errno) : "nothing sent");
                return 1;
            }
            off += (size_t)w;
        }
        uint64_t before = sent;
        sent += n;
        if (sent / MIB != before / MIB)
            say("cevm-guest: sent %llu MiB", (unsigned long long)(sent / MIB));
    }
    /* Our end, then the receiver's: it closes once it has checked every byte. */
    shutdown(fd, SHUT_WR);
    char b;
    ssize_t r;
    while ((r = read(fd, &b, 1)) < 0 && errno == EINTR)
        ;
    if (r < 0) {
        say("cevm-guest: stream reset after %llu bytes (waiting for the receiver to close: %s)",
            (unsigned long long)sent, why(errno));
        return 1;
    }
    if (r > 0) {
        say("cevm-guest: the receiver sent data back");
        return 1;
    }
    close(fd);
    say("cevm-guest: stream sent %llu", (unsigned long long)sent);
    return 0;
}

/* The one connection a receiver takes on PORT (waiting up to 300 s for it),
 * with the stall timeouts set; -1 if none came. */
static int accept_one(int port, uint64_t bytes)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = INADDR_ANY};
    if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 || bind(ls, (struct sockaddr *)&at, sizeof at) != 0 || listen(ls, 1) != 0) {
        say("cevm-guest: cannot listen on port %d: %s", port, strerror(errno));
        return -1;
    }
    say("cevm-guest: listening on port %d for %llu bytes", port, (unsigned long long)bytes);
    struct pollfd p = {.fd = ls, .events = POLLIN};
    int pr;
    while ((pr = poll(&p, 1, 300 * 1000)) < 0 && errno == EINTR)
        ;
    if (pr <= 0) {
        say("cevm-guest: nobody connected within 300 s");
        return -1;
    }
    struct sockaddr_in from;
    socklen_t fl = sizeof from;
    int fd = accept(ls, (struct sockaddr *)&from, &fl);
    if (fd < 0) {
        say("cevm-guest: accept: %s", strerror(errno));
        return -1;
    }
    close(ls);
    set_timeouts(fd);
    char peer[INET_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET, &from.sin_addr, peer, sizeof peer);
    say("cevm-guest: connection from %s", peer);
    return fd;
}

static int do_recv(int port, uint64_t bytes)
{
    int fd = accept_one(port, bytes);
    if (fd < 0)
        return 1;

    static uint8_t buf[65536];
    struct chain c;
    chain_init(&c);
    uint64_t got = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            say("cevm-guest: stream reset after %llu bytes (%s)", (unsigned long long)got, why(errno));
            return 1;
        }
        if (n == 0)
            break;
        for (ssize_t i = 0; i < n; i++) {
            if (got == bytes) {
                say("cevm-guest: stream longer than %llu bytes", (unsigned long long)bytes);
                return 1;
            }
            uint8_t want = chain_next(&c);
            if (buf[i] != want) {
                say("cevm-guest: stream mismatch at offset %llu: got 0x%02x, want 0x%02x", (unsigned long long)got,
                    buf[i], want);
                return 1;
            }
            got++;
            if (got % MIB == 0)
                say("cevm-guest: received %llu MiB", (unsigned long long)(got / MIB));
        }
    }
    if (got < bytes) {
        say("cevm-guest: stream reset after %llu bytes (the sender closed early)", (unsigned long long)got);
        return 1;
    }
    close(fd);
    say("cevm-guest: stream ok %llu", (unsigned long long)got);
    return 0;
}

/* The benchmark's load: BYTES (0: without end) of a constant buffer. */
static int do_blast(const char *host, int port, uint64_t bytes)
{
    int fd = connect_to(host, port);
    if (fd < 0)
        return fd == -2 ? 2 : 1;
    static uint8_t buf[65536];
    memset(buf, 0x5a, sizeof buf);
    uint64_t sent = 0;
    while (bytes == 0 || sent < bytes) {
        size_t n = bytes == 0 || bytes - sent > sizeof buf ? sizeof buf : (size_t)(bytes - sent);
        ssize_t w = send(fd, buf, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            say("cevm-guest: blast reset after %llu bytes (send: %s)", (unsigned long long)sent,
                w < 0 ? why(errno) : "nothing sent");
            return 1;
        }
        sent += (uint64_t)w;
    }
    shutdown(fd, SHUT_WR);
    char b;
    while (read(fd, &b, 1) < 0 && errno == EINTR)
        ;
    close(fd);
    say("cevm-guest: blast sent %llu", (unsigned long long)sent);
    return 0;
}

/* Gaps between reads longer than this are reported as stalls. */
#define STALL_REPORT_NS 20000000ull

static int do_sink(int port)
{
    int fd = accept_one(port, 0);
    if (fd < 0)
        return 1;
    static uint8_t buf[65536];
    uint64_t got = 0, first = 0, last = 0, longest = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            say("cevm-guest: sink reset after %llu bytes (%s)", (unsigned long long)got, why(errno));
            return 1;
        }
        if (n == 0)
            break;
        uint64_t t = now_ns();
        if (got == 0)
            first = t;
        else if (t - last > STALL_REPORT_NS)
            say("cevm-guest: stall %llu ms at %llu MiB", (unsigned long long)((t - last) / 1000000ull),
                (unsigned long long)(got / MIB));
        if (got > 0 && t - last > longest)
            longest = t - last;
        last = t;
        got += (uint64_t)n;
    }
    close(fd);
    uint64_t ms = (last - first) / 1000000ull;
    say("cevm-guest: sink %llu bytes in %llu ms, %.2f MiB/s, longest stall %llu ms", (unsigned long long)got,
        (unsigned long long)ms, ms ? (double)got / MIB * 1000.0 / (double)ms : 0.0,
        (unsigned long long)(longest / 1000000ull));
    return 0;
}

static int do_arpwatch(const char *iface)
{
    int fd = socket(AF_PACKET, SOCK_DGRAM, htons(ETH_P_ALL));
    unsigned idx = if_nametoindex(iface);
    if (fd < 0 || idx == 0) {
        say("cevm-guest: arpwatch %s: %s", iface, strerror(errno));
        return 1;
    }
    /* Only ARP reaches us (outgoing frames come to ETH_P_ALL sockets only). */
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_PROTOCOL)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_ARP, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, 0xffff),
        BPF_STMT(BPF_RET | BPF_K, 0),
    };
    struct sock_fprog prog = {.len = sizeof code / sizeof code[0], .filter = code};
    struct sockaddr_ll at = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL), .sll_ifindex = (int)idx};
    if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog) != 0 ||
        bind(fd, (struct sockaddr *)&at, sizeof at) != 0) {
        say("cevm-guest: arpwatch %s: %s", iface, strerror(errno));
        return 1;
    }
    for (;;) {
        uint8_t f[64];
        struct sockaddr_ll from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(fd, f, sizeof f, 0, (struct sockaddr *)&from, &fl);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            say("cevm-guest: arpwatch: %s", strerror(errno));
            return 1;
        }
        /* Ethernet/IPv4 ARP: htype ptype hlen plen op sha spa tha tpa. */
        if (n < 28 || from.sll_protocol != htons(ETH_P_ARP) || f[4] != 6 || f[5] != 4)
            continue;
        unsigned op = (unsigned)f[6] << 8 | f[7];
        char sip[INET_ADDRSTRLEN], tip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, f + 14, sip, sizeof sip);
        inet_ntop(AF_INET, f + 24, tip, sizeof tip);
        say("cevm-guest: arp %s %s %s %02x:%02x:%02x:%02x:%02x:%02x -> %s%s",
            from.sll_pkttype == PACKET_OUTGOING ? "out" : "in",
            op == 1 ? "request" : op == 2 ? "reply" : "op?", sip, f[8], f[9], f[10], f[11], f[12], f[13], tip,
            memcmp(f + 14, f + 24, 4) == 0 ? " gratuitous" : "");
    }
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc >= 5 && argc <= 6 && strcmp(argv[1], "send") == 0)
        return do_send(argv[2], atoi(argv[3]), strtoull(argv[4], NULL, 10),
                       argc == 6 ? strtoull(argv[5], NULL, 10) : 0);
    if (argc == 4 && strcmp(argv[1], "recv") == 0)
        return do_recv(atoi(argv[2]), strtoull(argv[3], NULL, 10));
    if (argc == 3 && strcmp(argv[1], "arpwatch") == 0)
        return do_arpwatch(argv[2]);
    if (argc == 5 && strcmp(argv[1], "blast") == 0)
        return do_blast(argv[2], atoi(argv[3]), strtoull(argv[4], NULL, 10));
    if (argc == 3 && strcmp(argv[1], "sink") == 0)
        return do_sink(atoi(argv[2]));
    say("usage: cevm-stream send HOST PORT BYTES [KIB_PER_S] | recv PORT BYTES | arpwatch IFACE | blast HOST PORT BYTES | sink PORT");
    return 2;
}
