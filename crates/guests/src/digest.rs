//! The digest the `digest` guest prints (`c/digest.c`), computed on the host,
//! so that a test knows an undisturbed run's result without running one (a
//! minute of guest time for the long runs the batch-job tests need).

fn mix(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(0x100_0000_01b3);
    h ^ (h >> 29)
}

/// Lanes of the area (`LANES` in `c/digest.c`).
const LANES: u64 = 8;

/// The digest `digest` guests with `mib=` and `rounds=` print (whatever their
/// number of vCPUs: each lane is computed by one vCPU alone).
pub fn digest(mib: u64, rounds: u64) -> u64 {
    let lane_words = (mib << 20) / 8 / LANES;
    let mut d = 0x8422_2325_cbf2_9ce4 ^ rounds;
    for lane in 0..LANES {
        let mut area: Vec<u64> =
            (0..lane_words).map(|i| (lane * lane_words + i).wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        let mut h = 0xcbf2_9ce4_8422_2325 ^ lane;
        for r in 1..=rounds {
            for w in area.iter_mut() {
                h = mix(h, w.wrapping_add(r));
                *w = h;
            }
        }
        d = mix(d, h);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_what_the_c_guest_prints() {
        // Printed by `cevm run --guest digest --guest-args "mib=1 rounds=16"`.
        assert_eq!(digest(1, 16), 0x5794_f09c_46ae_b831);
        // The same with --vcpus 2 (lanes shared out over the vCPUs).
        assert_eq!(digest(2, 3), 0x8061_6b04_2838_aaba);
        assert_eq!(digest(1, 1), 0x1ae9_df0c_7e7a_bfd3);
    }
}
