//! CPU placement of threads: the seed's "scheduling possibilities". vCPU threads
//! of each instance, and the migration and checkpoint-writer threads, are put on
//! explicit CPUs with `pthread_setaffinity_np` (the thread-level
//! `sched_setaffinity`), and the placement actually in force is read back for
//! reports.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A list of host CPUs, written like `0,2-3` (as `taskset -c` takes it), kept
/// in the order written: vCPU i goes on the i-th CPU of a vCPU list, so `1,0`
/// puts vCPU 0 on CPU 1 (a CPU written twice takes two vCPUs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuList(pub Vec<usize>);

impl std::str::FromStr for CpuList {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}`: expected a CPU list like 0,2-3");
        let mut cpus = Vec::new();
        for part in s.split(',') {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => {
                    (a.trim().parse::<usize>().map_err(|_| bad())?, b.trim().parse::<usize>().map_err(|_| bad())?)
                }
                None => {
                    let c = part.trim().parse::<usize>().map_err(|_| bad())?;
                    (c, c)
                }
            };
            if a > b || b >= libc::CPU_SETSIZE as usize {
                return Err(bad());
            }
            cpus.extend(a..=b);
        }
        Ok(CpuList(cpus))
    }
}

impl std::fmt::Display for CpuList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s: Vec<String> = self.0.iter().map(|c| c.to_string()).collect();
        write!(f, "{}", s.join(","))
    }
}

/// Restricts `thread` to `cpus`.
pub fn set_affinity(thread: libc::pthread_t, cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(Error::Config(format!("CPU {c} is beyond the largest CPU number")));
        }
        // SAFETY: `c` is inside the set, checked above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `thread` is a live thread of this process (the caller's guarantee) and
    // `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::pthread_setaffinity_np(thread, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(Error::Config(format!(
            "cannot place a thread on CPUs {}: {}",
            CpuList(cpus.to_vec()),
            std::io::Error::from_raw_os_error(r)
        )));
    }
    Ok(())
}

/// The CPUs `thread` may run on.
pub fn affinity(thread: libc::pthread_t) -> Vec<usize> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `thread` is a live thread of this process; `set` has the size passed.
    let r = unsafe { libc::pthread_getaffinity_np(thread, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET only reads `set`, an initialized cpu_set_t, and every `c`
    // is below CPU_SETSIZE, so inside it.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// The calling thread.
pub fn this_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_taskset() {
        assert_eq!("0,2-3".parse::<CpuList>().unwrap().0, vec![0, 2, 3]);
        assert_eq!("1".parse::<CpuList>().unwrap().to_string(), "1");
        // The order written is the order of the vCPUs placed.
        assert_eq!("1,0".parse::<CpuList>().unwrap().0, vec![1, 0]);
        assert_eq!("3,0-1,0".parse::<CpuList>().unwrap().to_string(), "3,0,1,0");
        assert!("3-1".parse::<CpuList>().is_err());
        assert!("a".parse::<CpuList>().unwrap_err().contains("0,2-3"));
    }

    #[test]
    fn a_thread_goes_where_it_is_put() {
        let all = affinity(this_thread());
        assert!(!all.is_empty());
        let t = std::thread::spawn(move || {
            set_affinity(this_thread(), &all[..1]).unwrap();
            affinity(this_thread())
        });
        assert_eq!(t.join().unwrap().len(), 1);
    }
}
