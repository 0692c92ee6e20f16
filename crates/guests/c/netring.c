/* netring: guests on one Ethernet bridge pass a token around a ring, each through
 * its own tiny polled virtio-net driver (virtio-mmio version 2, split virtqueues).
 *
 * `count` guests form a ring: guest k sends to guest (k + 1) % count. Guest 0 sends
 * the token for hop 1 with h = 0xcbf29ce484222325; the guest that receives the token
 * for hop j computes h' = step(h, j) over its own memory area (mib MiB at free_start,
 * of which the hop rewrites a 2 KiB chunk chosen by j, then `work` mixing rounds) and
 * sends the token for hop j + 1 on. The guest that computes hop `hops` has the digest
 * and sends a DONE message once around the ring. src/netring.rs computes the digest.
 *
 * Frames: raw Ethernet, ethertype 0x88b5, from 52:54:00:ce:00:<id> to the
 * neighbour's MAC, payload `struct frame`. Every DATA and DONE has a sequence number
 * on its link (from 1); the receiver takes the next one only, and answers every DATA
 * and DONE, duplicates too, with an ACK carrying the next number it expects (a
 * cumulative ack). The sender keeps the last HIST messages it sent and sends the
 * first unacknowledged one again after RTO_MS, or at once when an ACK asks for an
 * older one: a guest restored from a checkpoint has forgotten what it received, and
 * the ACKs it sends every WANT_MS while it waits get that resent. Everything is
 * deterministic, so a message computed again after a restore is the same one, and
 * the digest does not depend on losses, duplicates, delays or restores.
 *
 * With strict=1 a guest does not heal what only an inconsistent restore of the
 * ring causes (a group checkpoint must be a consistent cut, see cevm's `group`),
 * it fails, saying so: a successor's ACK asking again for a message it had
 * acknowledged (it lost a message its predecessor's checkpoint holds as
 * delivered), or a message received twice with different stamps (an orphan:
 * its receiver's checkpoint holds it as received, its sender's does not hold it
 * as sent, and the sender made it anew). A stamp is the sender's clock when it
 * first made the message, kept with it for every resend; it is in no digest.
 *
 * A NIC that offers VIRTIO_NET_F_GUEST_ANNOUNCE may ask the guest to announce
 * itself (cevm does after a migration or a restore): it then sends one broadcast
 * frame from its MAC, so that the bridges between it and its neighbours learn at
 * once where it is now (its ring frames are unicast: a bridge that still holds its
 * old place would drop them), and acknowledges on the control queue.
 *
 * A guest exits once it has the digest, has received DONE from its predecessor, all
 * it sent is acknowledged and both neighbours have been quiet for QUIET_MS (so that
 * it acks a DONE resent because its ACK was lost); it stops resending an
 * unacknowledged DONE after DONE_GIVE_UP_MS.
 *
 * args: id=<0..count-1, default 0> count=<guests, 2..8, default 2> hops=<default 100>
 *       mib=<MiB of the area, default 1> work=<mixing rounds a hop, default 256>
 *       strict=<1: fail on an inconsistent restore, default 0>
 * prints: "netring: id=K count=N hops=H", "netring: hop J/H" each time it sends the
 *         token for hop J (not when resending it), "netring: digest=<16 hex digits>";
 *         exits 0 (1 on bad arguments, no usable virtio-net device, a wrong MAC;
 *         with strict=1, "netring: inconsistent cut: ..." and 1). */
#include "cevm_guest.h"

/* ---- virtio-mmio, version 2 (virtio 1.2 §4.2) ---- */
#define NIC_BASE(i) (0xd0000000UL + (1 + (u64)(i)) * 0x1000)
enum { /* register offsets, §4.2.2 */
    R_MAGIC = 0x000, R_VERSION = 0x004, R_DEVICE_ID = 0x008,
    R_DEVICE_FEATURES = 0x010, R_DEVICE_FEATURES_SEL = 0x014,
    R_DRIVER_FEATURES = 0x020, R_DRIVER_FEATURES_SEL = 0x024,
    R_QUEUE_SEL = 0x030, R_QUEUE_NUM_MAX = 0x034, R_QUEUE_NUM = 0x038, R_QUEUE_READY = 0x044,
    R_QUEUE_NOTIFY = 0x050, R_STATUS = 0x070,
    R_QUEUE_DESC = 0x080, R_QUEUE_DRIVER = 0x090, R_QUEUE_DEVICE = 0x0a0, /* low; high at +4 */
    R_CONFIG_GENERATION = 0x0fc, R_CONFIG = 0x100,
};
#define S_ACKNOWLEDGE 1 /* device status bits, §2.1 */
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define F_NET_MAC (1UL << 5)    /* §5.1.3: config space holds the MAC */
#define F_NET_STATUS (1UL << 16)   /* config space holds the status */
#define F_NET_CTRL_VQ (1UL << 17)  /* the control queue */
#define F_NET_ANNOUNCE (1UL << 21) /* the device asks the driver to announce itself */
#define F_ANNOUNCING (F_NET_STATUS | F_NET_CTRL_VQ | F_NET_ANNOUNCE)
#define NET_S_ANNOUNCE 2 /* §5.1.4: status bit */
#define CTRL_ANNOUNCE 3  /* §5.1.6.5.4: class, and its one command, ACK */
#define CTRL_ANNOUNCE_ACK 0
#define F_VERSION_1 (1UL << 32) /* §6: a modern device */

static u64 nic;

static u32 rd(u32 off) { return *(volatile u32 *)(nic + off); }
static u8 rd8(u32 off) { return *(volatile u8 *)(nic + off); } /* config space, byte-wise */
static void wr(u32 off, u32 v)
{
    __asm__ volatile("" ::: "memory"); /* ring updates before the register write */
    *(volatile u32 *)(nic + off) = v;
}

/* ---- split virtqueues (§2.7); descriptor i always owns buffer i ---- */
#define QSIZE 16
#define RXQ 0 /* receiveq1, §5.1.2 */
#define TXQ 1 /* transmitq1 */
#define CTRLQ 2 /* controlq, with VIRTIO_NET_F_CTRL_VQ and one queue pair */
#define NET_HDR_LEN 12 /* virtio_net_hdr, num_buffers included with VERSION_1 (§5.1.6) */
#define RX_BUF_LEN (NET_HDR_LEN + 1514) /* §5.1.6.3.1: no MRG_RXBUF nor GUEST_TSO/UFO */
#define TX_BUF_LEN 128
#define DESC_F_NEXT 1            /* §2.7.5: the chain goes on at `next` */
#define DESC_F_WRITE 2           /* §2.7.5: the device writes the buffer */
#define AVAIL_F_NO_INTERRUPT 1   /* §2.7.7: we poll, the device need not interrupt */

struct vq {
    struct { u64 addr; u32 len; u16 flags, next; } desc[QSIZE]; /* §2.7.5, 16-byte aligned */
    struct { u16 flags, idx, ring[QSIZE], used_event; } avail;   /* §2.7.6 */
    struct { u16 flags, idx; struct { u32 id, len; } ring[QSIZE]; u16 avail_event; } used
        __attribute__((aligned(4))); /* §2.7.8 */
    u16 next_avail, next_used;       /* the driver's own: avail.idx, first unseen used entry */
} __attribute__((aligned(16)));

static struct vq rxq, txq, ctrlq;
static int announcing; /* the device may ask us to announce ourselves */
static u8 rx_buf[QSIZE][RX_BUF_LEN] __attribute__((aligned(64)));
static u8 tx_buf[QSIZE][TX_BUF_LEN] __attribute__((aligned(64)));
static u8 tx_busy[QSIZE];
static u32 rx_unannounced;

/* Makes descriptor `d` available (§2.7.13): ring entry first, then the index. */
static void vq_push(struct vq *q, u16 d)
{
    q->avail.ring[q->next_avail % QSIZE] = d;
    __atomic_store_n(&q->avail.idx, ++q->next_avail, __ATOMIC_RELEASE);
}

/* The next used entry (§2.7.14), polled in memory: 0 when there is none. */
static int vq_pop(struct vq *q, u32 *d, u32 *len)
{
    if (__atomic_load_n(&q->used.idx, __ATOMIC_ACQUIRE) == q->next_used)
        return 0;
    *d = q->used.ring[q->next_used % QSIZE].id;
    *len = q->used.ring[q->next_used % QSIZE].len;
    q->next_used++;
    return 1;
}

static int queue_setup(u32 index, struct vq *q)
{
    wr(R_QUEUE_SEL, index); /* §4.2.3.2 */
    if (rd(R_QUEUE_READY) != 0 || rd(R_QUEUE_NUM_MAX) < QSIZE)
        return 0;
    wr(R_QUEUE_NUM, QSIZE);
    u64 addr[3] = {(u64)&q->desc, (u64)&q->avail, (u64)&q->used};
    for (u32 i = 0; i < 3; i++) {
        wr(R_QUEUE_DESC + i * 0x10, (u32)addr[i]);
        wr(R_QUEUE_DESC + i * 0x10 + 4, (u32)(addr[i] >> 32));
    }
    q->avail.flags = AVAIL_F_NO_INTERRUPT;
    wr(R_QUEUE_READY, 1);
    return 1;
}

static void fail(const char *why)
{
    puts("netring: ");
    puts(why);
    puts("\n");
    guest_exit(1);
}

static void put_mac(const u8 *m)
{
    for (int i = 0; i < 6; i++) {
        put_hex(m[i], 2);
        if (i < 5)
            putc(':');
    }
}

/* Finds the first virtio-net device and brings it up (§3.1.1), checking that its MAC
 * (config space, §5.1.4) is `want`. */
static void nic_init(const u8 *want)
{
    for (int i = 0; i < 8 && !nic; i++) {
        nic = NIC_BASE(i); /* §4.2.3.1: magic, version 2, device ID 1 = network card */
        if (rd(R_MAGIC) != 0x74726976 || rd(R_VERSION) != 2 || rd(R_DEVICE_ID) != 1)
            nic = 0;
    }
    if (!nic)
        fail("no virtio-net device (virtio-mmio version 2)");
    wr(R_STATUS, 0); /* reset */
    wr(R_STATUS, S_ACKNOWLEDGE);
    wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    wr(R_DEVICE_FEATURES_SEL, 1);
    u64 offered = (u64)rd(R_DEVICE_FEATURES) << 32;
    wr(R_DEVICE_FEATURES_SEL, 0);
    offered |= rd(R_DEVICE_FEATURES);
    /* No offloads. The announcement if offered: after a move to another host, one
     * broadcast frame tells the bridges on the way where this MAC is now. */
    u64 accepted = offered & (F_VERSION_1 | F_NET_MAC);
    announcing = (offered & F_ANNOUNCING) == F_ANNOUNCING;
    if (announcing)
        accepted |= F_ANNOUNCING;
    if ((accepted & (F_VERSION_1 | F_NET_MAC)) != (F_VERSION_1 | F_NET_MAC))
        fail("the NIC does not offer VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC");
    wr(R_DRIVER_FEATURES_SEL, 0);
    wr(R_DRIVER_FEATURES, (u32)accepted);
    wr(R_DRIVER_FEATURES_SEL, 1);
    wr(R_DRIVER_FEATURES, (u32)(accepted >> 32));
    wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(rd(R_STATUS) & S_FEATURES_OK))
        fail("the NIC refused our features (FEATURES_OK did not stick)");
    if (!queue_setup(RXQ, &rxq) || !queue_setup(TXQ, &txq) || (announcing && !queue_setup(CTRLQ, &ctrlq)))
        fail("the NIC's queues cannot be set up (ready already, or QueueNumMax < 16)");

    u8 m[6];
    u32 generation;
    do { /* §2.5.1: read again if the configuration changed meanwhile */
        generation = rd(R_CONFIG_GENERATION);
        for (int i = 0; i < 6; i++)
            m[i] = rd8(R_CONFIG + i);
    } while (generation != rd(R_CONFIG_GENERATION));
    for (int i = 0; i < 6; i++)
        if (m[i] != want[i]) {
            puts("netring: the NIC's MAC is ");
            put_mac(m);
            puts(", expected ");
            put_mac(want);
            puts("\n");
            guest_exit(1);
        }

    for (u16 d = 0; d < QSIZE; d++) { /* fill the receive queue (§5.1.6.3) */
        rxq.desc[d].addr = (u64)rx_buf[d];
        rxq.desc[d].len = RX_BUF_LEN;
        rxq.desc[d].flags = DESC_F_WRITE;
        vq_push(&rxq, d);
    }
    wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    wr(R_QUEUE_NOTIFY, RXQ); /* §4.2.3.3 */
}

/* Gives a received buffer back; the device hears of it every QSIZE/2 buffers, which
 * leaves it some at all times without a VM exit for each frame. */
static void rx_recycle(u32 d)
{
    vq_push(&rxq, (u16)d);
    if (++rx_unannounced == QSIZE / 2) {
        rx_unannounced = 0;
        wr(R_QUEUE_NOTIFY, RXQ);
    }
}

/* Sends `len` bytes of frame: one descriptor, an all-zero header (no offloads,
 * §5.1.6.2) and the frame. Dropped when every buffer is still with the device. */
static void tx(const void *frame, u32 len)
{
    u32 d, n;
    while (vq_pop(&txq, &d, &n))
        if (d < QSIZE)
            tx_busy[d] = 0;
    for (d = 0; d < QSIZE && tx_busy[d]; d++)
        ;
    if (d == QSIZE)
        return;
    memset(tx_buf[d], 0, NET_HDR_LEN);
    memcpy(tx_buf[d] + NET_HDR_LEN, frame, len);
    txq.desc[d].addr = (u64)tx_buf[d];
    txq.desc[d].len = NET_HDR_LEN + len;
    txq.desc[d].flags = 0;
    tx_busy[d] = 1;
    vq_push(&txq, (u16)d);
    wr(R_QUEUE_NOTIFY, TXQ);
}

/* Whether the device asks for an announcement (config status, §5.1.4). */
static int announce_asked(void)
{
    u32 generation;
    u8 lo;
    do {
        generation = rd(R_CONFIG_GENERATION);
        lo = rd8(R_CONFIG + 6);
    } while (generation != rd(R_CONFIG_GENERATION));
    return (lo & NET_S_ANNOUNCE) != 0;
}

/* Announces this guest (a broadcast frame from its MAC, which receivers ignore: it
 * is addressed to none of them), then tells the device it did (§5.1.6.5.4). */
static void announce(const u8 *mac)
{
    static u8 cmd[2], ack;
    u8 frame[60];
    memset(frame, 0, sizeof frame);
    memset(frame, 0xff, 6);
    memcpy(frame + 6, mac, 6);
    frame[12] = 0x88;
    frame[13] = 0xb5;
    tx(frame, sizeof frame);
    cmd[0] = CTRL_ANNOUNCE;
    cmd[1] = CTRL_ANNOUNCE_ACK;
    ack = 0xff;
    ctrlq.desc[0].addr = (u64)cmd;
    ctrlq.desc[0].len = 2;
    ctrlq.desc[0].flags = DESC_F_NEXT;
    ctrlq.desc[0].next = 1;
    ctrlq.desc[1].addr = (u64)&ack;
    ctrlq.desc[1].len = 1;
    ctrlq.desc[1].flags = DESC_F_WRITE;
    vq_push(&ctrlq, 0);
    wr(R_QUEUE_NOTIFY, CTRLQ);
    u32 d, n;
    while (!vq_pop(&ctrlq, &d, &n))
        cpu_relax();
}

/* ---- the ring ---- */
#define ETHERTYPE 0x88b5
#define MSG_MAGIC 0x676e726eU /* "nrng" */
enum { DATA = 1, ACK = 2, DONE = 3 };

struct frame {
    u8 dst[6], src[6];
    u8 ethertype[2]; /* big-endian, the rest little-endian */
    u32 magic;
    u8 type, from, count, zero; /* zero: reserved, 0 */
    u64 seq;   /* DATA, DONE: number on the link, from 1; ACK: the next one expected */
    u64 hop;   /* DATA: the hop the receiver computes; DONE: hops; ACK: 0 */
    u64 value; /* DATA: h to step; DONE: the digest; ACK: 0 */
    u64 stamp; /* DATA, DONE: the sender's clock when it made the message; ACK: 0 */
} __attribute__((packed));
#define FRAME_LEN 60 /* sizeof(struct frame) is 54: padded to Ethernet's minimum */

#define H0 0xcbf29ce484222325UL
#define CHUNK_WORDS 256 /* 2 KiB */
#define HIST 4096       /* messages kept for resending */
#define RTO_MS 200
#define WANT_MS 300
#define QUIET_MS 2000
#define DONE_GIVE_UP_MS 30000
#define JUMP_MS 500      /* a longer gap between two polls: the VM was paused */
#define POLLS_A_MS 20    /* the clock without a TSC frequency: polls */
#define ANNOUNCE_CHECK_MS 50 /* how often the device's status is read */

static u64 id, count, hops, work, chunks, *area;
static struct { u64 type, hop, value, stamp; } sent[HIST];
static u64 got_stamp[HIST]; /* the stamp of each message received, by sequence number */
static int strict;
static u64 next_send, acked, expected; /* link to the successor; from the predecessor */
static u64 ms, polls, prev_t, last_tx, last_ack, last_heard, done_since, resent, last_check;
static int have_digest, got_done, use_tsc;
static u64 digest;

static u64 now(void) { return use_tsc ? rdtsc() : polls; }

static void mac_of(u64 k, u8 *m)
{
    static const u8 prefix[5] = {0x52, 0x54, 0x00, 0xce, 0x00};
    memcpy(m, prefix, 5);
    m[5] = (u8)k;
}

static void send_frame(u64 to, u64 type, u64 seq, u64 hop, u64 value, u64 stamp)
{
    u8 buf[FRAME_LEN];
    struct frame *f = (struct frame *)buf;
    memset(buf, 0, sizeof buf);
    mac_of(to, f->dst);
    mac_of(id, f->src);
    f->ethertype[0] = ETHERTYPE >> 8;
    f->ethertype[1] = ETHERTYPE & 0xff;
    f->magic = MSG_MAGIC;
    f->type = (u8)type;
    f->from = (u8)id;
    f->count = (u8)count;
    f->seq = seq;
    f->hop = hop;
    f->value = value;
    f->stamp = stamp;
    tx(buf, sizeof buf);
}

static void send_ack(void)
{
    send_frame((id + count - 1) % count, ACK, expected, 0, 0, 0);
    last_ack = now();
}

static void transmit(u64 seq)
{
    if (next_send - seq > HIST) { /* a restored successor wants what we no longer have */
        puts("netring: message no longer kept: seq=");
        put_dec(seq);
        puts("\n");
        last_tx = now();
        return;
    }
    send_frame((id + 1) % count, sent[seq % HIST].type, seq, sent[seq % HIST].hop,
               sent[seq % HIST].value, sent[seq % HIST].stamp);
    last_tx = now();
}

static void send_new(u64 type, u64 hop, u64 value)
{
    u64 seq = next_send++;
    sent[seq % HIST].type = type;
    sent[seq % HIST].hop = hop;
    sent[seq % HIST].value = value;
    sent[seq % HIST].stamp = rdtsc() ^ polls;
    if (type == DATA) {
        puts("netring: hop ");
        put_dec(hop);
        puts("/");
        put_dec(hops);
        puts("\n");
    }
    transmit(seq);
}

static u64 mix(u64 h, u64 w)
{
    h ^= w;
    h *= 0x100000001b3UL;
    h ^= h >> 29;
    return h;
}

/* Hop j at this guest: folds j, id and a chunk of the area chosen by j into h,
 * rewriting the chunk as it goes, then `work` mixing rounds. */
static u64 step(u64 h, u64 j)
{
    u64 *p = area + ((j * 0x9e3779b97f4a7c15UL) >> 32) % chunks * CHUNK_WORDS;
    h = mix(mix(h, j), id);
    for (u64 i = 0; i < CHUNK_WORDS; i++) {
        h = mix(h, p[i]);
        p[i] = h;
    }
    for (u64 r = 0; r < work; r++)
        h = mix(h, r);
    return h;
}

static void learn(u64 d)
{
    if (have_digest && d != digest)
        fail("two different digests");
    if (have_digest)
        return;
    have_digest = 1;
    digest = d;
    puts("netring: digest=");
    put_hex(d, 16);
    puts("\n");
}

/* An in-order DATA or DONE from the predecessor. */
static void take(const struct frame *f)
{
    if (f->type == DONE) {
        if (f->hop != hops)
            fail("DONE for another number of hops");
        int first = !have_digest; /* not the guest that computed it: pass it on */
        got_done = 1;
        done_since = now();
        learn(f->value);
        if (first)
            send_new(DONE, hops, f->value);
        return;
    }
    if (f->hop == 0 || f->hop > hops || f->hop % count != id)
        fail("token for a hop that is not ours (do all guests have the same args?)");
    u64 h = step(f->value, f->hop);
    if (f->hop < hops) {
        send_new(DATA, f->hop + 1, h);
    } else {
        learn(h);
        send_new(DONE, hops, h);
    }
}

/* An ACK from the successor: it has everything before `next`. */
static void on_ack(u64 next)
{
    if (strict && next < acked)
        fail("inconsistent cut: the successor lost a message it had acknowledged");
    u64 before = acked;
    acked = next < next_send ? next : next_send; /* the latest report wins */
    if (acked < next_send && (acked != before || now() - last_tx >= RTO_MS / 4 * ms))
        transmit(acked);
}

static void receive(const u8 *b, u32 len)
{
    const struct frame *f = (const struct frame *)b;
    u8 m[6];
    if (len < sizeof *f || f->ethertype[0] != ETHERTYPE >> 8 || f->ethertype[1] != (ETHERTYPE & 0xff) ||
        f->magic != MSG_MAGIC || f->count != count || f->from >= count)
        return;
    mac_of(id, m);
    for (int i = 0; i < 6; i++)
        if (f->dst[i] != m[i])
            return;
    mac_of(f->from, m);
    for (int i = 0; i < 6; i++)
        if (f->src[i] != m[i])
            return;
    if (f->type == ACK && f->from == (id + 1) % count) {
        last_heard = now();
        on_ack(f->seq);
    } else if ((f->type == DATA || f->type == DONE) && f->from == (id + count - 1) % count) {
        last_heard = now();
        if (f->seq == expected) {
            expected++;
            got_stamp[f->seq % HIST] = f->stamp;
            send_ack(); /* before the work, so the predecessor does not resend meanwhile */
            take(f);
        } else {
            if (strict && f->seq < expected && expected - f->seq <= HIST &&
                got_stamp[f->seq % HIST] != f->stamp)
                fail("inconsistent cut: a message came again, made anew (an orphan)");
            send_ack(); /* a duplicate, or one after a gap: say what we expect */
        }
    }
}

void guest_main(struct boot_info *bi, u64 cpu)
{
    if (cpu != 0)
        park();
    id = arg_u64(bi, "id", 0);
    count = arg_u64(bi, "count", 2);
    hops = arg_u64(bi, "hops", 100);
    u64 mib = arg_u64(bi, "mib", 1);
    work = arg_u64(bi, "work", 256);
    strict = arg_u64(bi, "strict", 0) != 0;
    puts("netring: id=");
    put_dec(id);
    puts(" count=");
    put_dec(count);
    puts(" hops=");
    put_dec(hops);
    puts("\n");
    if (count < 2 || count > 8 || id >= count || hops == 0 || mib == 0 ||
        bi->free_start + (mib << 20) > bi->free_end)
        fail("bad arguments (2 <= count <= 8, id < count, hops >= 1, 1 <= mib <= free memory)");
    use_tsc = bi->tsc_khz != 0;
    ms = use_tsc ? bi->tsc_khz : POLLS_A_MS;

    u8 m[6];
    mac_of(id, m);
    nic_init(m);
    area = (u64 *)bi->free_start;
    chunks = (mib << 20) / (CHUNK_WORDS * 8);
    for (u64 i = 0; i < (mib << 20) / 8; i++)
        area[i] = (i ^ (id << 56)) * 0x9e3779b97f4a7c15UL;

    next_send = acked = expected = 1;
    prev_t = last_tx = last_ack = last_heard = done_since = last_check = now();
    if (id == 0)
        send_new(DATA, 1, H0);
    for (;;) {
        u32 d, len;
        polls++;
        while (vq_pop(&rxq, &d, &len)) {
            if (d < QSIZE && len > NET_HDR_LEN && len <= RX_BUF_LEN)
                receive(rx_buf[d] + NET_HDR_LEN, len - NET_HDR_LEN);
            if (d < QSIZE)
                rx_recycle(d);
        }
        u64 t = now();
        if (t < prev_t) /* a clock gone back: start every timer again */
            last_tx = last_ack = last_heard = done_since = last_check = t;
        else if (t - prev_t > JUMP_MS * ms) /* paused: the neighbours may have been too */
            last_heard = done_since = t;
        prev_t = t;
        if (acked < next_send && t - last_tx >= RTO_MS * ms) {
            transmit(acked);
            resent++;
        }
        if (!got_done && t - last_ack >= WANT_MS * ms)
            send_ack(); /* also asks a predecessor for what a restore made us forget */
        if (announcing && t - last_check >= ANNOUNCE_CHECK_MS * ms) {
            last_check = t;
            if (announce_asked())
                announce(m);
        }
        if (have_digest && got_done &&
            ((acked == next_send && t - last_heard >= QUIET_MS * ms) || t - done_since >= DONE_GIVE_UP_MS * ms))
            break;
        cpu_relax();
    }
    puts("netring: done, resent=");
    put_dec(resent);
    puts(acked == next_send ? "\n" : " (the last DONE was not acknowledged)\n");
    guest_exit(0);
}
