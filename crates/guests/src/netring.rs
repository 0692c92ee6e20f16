//! The digest the `netring` guests print (`c/netring.c`), computed on the host.
//!
//! `count` guests pass a token around a ring: guest 0 sends the token for hop 1
//! with [`H0`], the guest that receives the token for hop `j` is `j % count`; it
//! folds `j`, its id and a chunk of its own memory area (chosen by `j`, rewritten
//! as it is read) into the token's value, then runs `work` mixing rounds. The value
//! after hop `hops` is the digest. Losses, duplicates, pauses or restores on the way
//! do not change it: this function is what an undisturbed ring prints.

use std::collections::HashMap;

/// The token's value before hop 1.
pub const H0: u64 = 0xcbf2_9ce4_8422_2325;
/// Words of the chunk of its area a hop reads and rewrites (2 KiB).
const CHUNK_WORDS: u64 = 256;

fn mix(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(0x100_0000_01b3);
    h ^ (h >> 29)
}

/// Word `i` of guest `id`'s area as the guest fills it at boot.
fn initial_word(id: u64, i: u64) -> u64 {
    (i ^ (id << 56)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The chunk of its area hop `j` works on, of `chunks`.
fn chunk_of(j: u64, chunks: u64) -> u64 {
    (j.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % chunks
}

/// Hop `j` at guest `id`, whose area's chunk is `chunk`: the next value of the token.
fn step(h: u64, id: u64, j: u64, chunk: &mut [u64], work: u64) -> u64 {
    let mut h = mix(mix(h, j), id);
    for w in chunk.iter_mut() {
        h = mix(h, *w);
        *w = h;
    }
    (0..work).fold(h, mix)
}

/// The digest `netring` guests with `count=`, `hops=`, `mib=` and `work=` print.
///
/// Only the chunks the hops touch are kept, so this takes time and memory in
/// proportion to `hops`, whatever `mib` is.
///
/// # Panics
///
/// If `count` or `mib` is 0 (arguments the guests refuse).
pub fn netring_digest(count: u32, hops: u64, mib: u64, work: u64) -> u64 {
    assert!(count > 0 && mib > 0, "netring needs count > 0 and mib > 0");
    let chunks = (mib << 20) / (CHUNK_WORDS * 8);
    let mut areas: HashMap<(u64, u64), Vec<u64>> = HashMap::new();
    let mut h = H0;
    for j in 1..=hops {
        let id = j % u64::from(count);
        let c = chunk_of(j, chunks);
        let chunk = areas
            .entry((id, c))
            .or_insert_with(|| (c * CHUNK_WORDS..(c + 1) * CHUNK_WORDS).map(|i| initial_word(id, i)).collect());
        h = step(h, id, j, chunk, work);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_what_the_c_guests_print() {
        // Printed by c/netring.c, built for the host with a simulated device.
        assert_eq!(netring_digest(3, 30, 1, 256), 0x9375_cd49_abac_209b);
        assert_eq!(netring_digest(8, 100, 2, 10), 0xd725_ef4d_f471_7821);
        assert_eq!(netring_digest(2, 1, 1, 256), 0xca4f_ade3_3807_0dfe);
        assert_eq!(netring_digest(5, 7, 3, 0), 0x284e_7c88_1bd0_35dd);
    }

    #[test]
    fn the_digest_is_deterministic_and_depends_on_every_argument() {
        let d = netring_digest(4, 50, 1, 256);
        assert_eq!(d, netring_digest(4, 50, 1, 256));
        let others = [
            netring_digest(3, 50, 1, 256),
            netring_digest(4, 49, 1, 256),
            netring_digest(4, 51, 1, 256),
            netring_digest(4, 50, 2, 256),
            netring_digest(4, 50, 1, 255),
        ];
        for o in others {
            assert_ne!(d, o);
        }
    }

    #[test]
    fn a_chunk_a_hop_rewrote_is_read_again_rewritten() {
        // With one chunk only (mib=1 holds 512), every hop of a guest after its
        // first reads what its previous hop wrote: the same as a fresh area's chunk
        // would give differs.
        let chunks = (1u64 << 20) / (CHUNK_WORDS * 8);
        assert_eq!(chunks, 512);
        let fresh = |id: u64, c: u64| (c * CHUNK_WORDS..(c + 1) * CHUNK_WORDS).map(|i| initial_word(id, i)).collect();
        let mut chunk: Vec<u64> = fresh(1, 0);
        let once = step(H0, 1, 1, &mut chunk, 0);
        let again = step(H0, 1, 1, &mut chunk, 0);
        assert_ne!(once, again);
        assert_eq!(once, step(H0, 1, 1, &mut fresh(1, 0), 0));
        assert_ne!(once, step(H0, 2, 1, &mut fresh(2, 0), 0), "the guest's id is folded in");
    }

    #[test]
    #[should_panic(expected = "count > 0")]
    fn no_guests_is_refused() {
        netring_digest(0, 1, 1, 0);
    }
}
