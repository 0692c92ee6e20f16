//! A migration held at its switch for a group's coordinator: the member's side
//! of a group's consistent cut (`cevm group checkpoint --strategy cevm`).
//!
//! A held migration runs its pre-copy as usual until it could switch
//! ([`State::Ready`]), then goes on copying what the guest dirties, guest
//! running, until the coordinator says [`Barrier::cut`]. It then switches:
//! the vCPUs and the NICs stop, the last pages and the state move, and the new
//! instance is made **paused** ([`State::Switched`]). The guest runs again,
//! in the new instance, only when the coordinator says [`Barrier::go`], which
//! it says once every member has switched. So no member's guest runs past its
//! cut while another member's guest has not reached its own: the cut is
//! consistent (the argument is in `cevm`'s `group::take`).
//!
//! Neither wait is for ever, so a coordinator that dies leaves no member
//! stuck: one not cut within [`Leases::cut`] of being ready gives up (the
//! guest never stopped; it runs on where it was), and one not released within
//! [`Leases::go`] of its switch lets its guest run on (that checkpoint then
//! belongs to no group: a late `go` is refused, which aborts the group's).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where a held migration is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "reason")]
pub enum State {
    /// The pre-copy runs; the migration could not switch yet.
    Preparing,
    /// It could switch now; the guest runs and its dirty pages keep moving.
    Ready,
    /// The coordinator said cut: the switch is under way.
    Cut,
    /// The guest is stopped, whole, in the paused new instance.
    Switched,
    /// The coordinator said go: the guest runs in the new instance.
    Released,
    /// It ended without a group cut, and why: the coordinator aborted, a
    /// lease ran out, or the migration failed.
    Aborted(String),
}

impl State {
    /// The state's name, as the API shows it.
    pub fn name(&self) -> &'static str {
        match self {
            State::Preparing => "preparing",
            State::Ready => "ready",
            State::Cut => "cut",
            State::Switched => "switched",
            State::Released => "released",
            State::Aborted(_) => "aborted",
        }
    }
}

/// How long a held migration waits for its coordinator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Leases {
    /// From ready to cut (the guest runs meanwhile).
    pub cut: Duration,
    /// From switched to go (the guest is stopped meanwhile).
    pub go: Duration,
}

impl Default for Leases {
    fn default() -> Self {
        // Other members' pre-copies may take a while (the slowest member sets
        // when all are ready); a stopped guest is what a user notices.
        Leases { cut: Duration::from_secs(120), go: Duration::from_secs(10) }
    }
}

/// A refused command of the coordinator: the state it found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the checkpoint is {} here{}", .0.name(), match .0 { State::Aborted(r) => format!(" ({r})"), _ => String::new() })]
pub struct Refused(pub State);

/// What the engine's wait for the coordinator came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Go on (cut, or go).
    Yes,
    /// Not yet: the engine goes on with what it does and asks again.
    NotYet,
    /// Give up the group cut, and why.
    No(String),
}

/// The member's side of a group cut, shared by the migration engine, which
/// moves it on, and the control API's thread, which carries the
/// coordinator's commands.
#[derive(Debug)]
pub struct Barrier {
    state: Mutex<(State, Instant)>,
    changed: Condvar,
    leases: Leases,
}

impl Barrier {
    pub fn new(leases: Leases) -> Self {
        Barrier { state: Mutex::new((State::Preparing, Instant::now())), changed: Condvar::new(), leases }
    }

    fn lock(&self) -> MutexGuard<'_, (State, Instant)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, g: &mut (State, Instant), s: State) {
        *g = (s, Instant::now());
        self.changed.notify_all();
    }

    /// Where it is.
    pub fn state(&self) -> State {
        self.lock().0.clone()
    }

    /// The coordinator: switch now (only once ready).
    pub fn cut(&self) -> Result<(), Refused> {
        self.advance(State::Ready, State::Cut)
    }

    /// The coordinator: let the guest run (only once switched).
    pub fn go(&self) -> Result<(), Refused> {
        self.advance(State::Switched, State::Released)
    }

    /// Moves from `from` to `to`; refused in any other state.
    fn advance(&self, from: State, to: State) -> Result<(), Refused> {
        let mut g = self.lock();
        if g.0 != from {
            return Err(Refused(g.0.clone()));
        }
        self.set(&mut g, to);
        Ok(())
    }

    /// The coordinator gives the group cut up. Before the switch the migration
    /// ends and the guest runs on where it was; at or after it, the guest runs
    /// on in the new instance (it cannot go back), and the checkpoint belongs
    /// to no group. A migration that already ended is left as it is.
    pub fn abort(&self, why: &str) -> Result<(), Refused> {
        let mut g = self.lock();
        match g.0 {
            State::Released | State::Aborted(_) => Err(Refused(g.0.clone())),
            _ => {
                self.set(&mut g, State::Aborted(format!("the group coordinator aborted: {why}")));
                Ok(())
            }
        }
    }

    /// Waits up to `timeout` while the switch runs (state `Cut`).
    pub fn wait_switched(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while g.0 == State::Cut {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            g = self.changed.wait_timeout(g, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The engine: the pre-copy could switch now.
    pub(crate) fn ready(&self) {
        let mut g = self.lock();
        if g.0 == State::Preparing {
            self.set(&mut g, State::Ready);
        }
    }

    /// The engine, ready: waits up to `poll` for the cut. An abort, or the
    /// cut lease run out, is a no (the state says so from then on).
    pub(crate) fn wait_cut(&self, poll: Duration) -> Heard {
        let mut g = self.lock();
        let deadline = Instant::now() + poll;
        loop {
            match &g.0 {
                State::Cut => return Heard::Yes,
                State::Aborted(why) => return Heard::No(why.clone()),
                State::Ready if g.1.elapsed() >= self.leases.cut => {
                    let why = format!("the group coordinator did not cut within {} s", self.leases.cut.as_secs());
                    self.set(&mut g, State::Aborted(why.clone()));
                    return Heard::No(why);
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Heard::NotYet;
            }
            g = self.changed.wait_timeout(g, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The engine: the new instance holds the whole guest, paused. Waits for
    /// go; an abort, or the go lease run out, is a no. Either way the guest
    /// runs on afterwards.
    pub(crate) fn switched_wait_go(&self) -> Heard {
        let mut g = self.lock();
        if g.0 == State::Cut {
            self.set(&mut g, State::Switched);
        }
        loop {
            match &g.0 {
                State::Released => return Heard::Yes,
                State::Aborted(why) => return Heard::No(why.clone()),
                _ if g.1.elapsed() >= self.leases.go => {
                    let why = format!(
                        "the group coordinator did not say go within {} s of the switch; the guest runs on",
                        self.leases.go.as_secs()
                    );
                    self.set(&mut g, State::Aborted(why.clone()));
                    return Heard::No(why);
                }
                _ => {}
            }
            let left = self.leases.go.saturating_sub(g.1.elapsed());
            g = self.changed.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The engine: the migration failed (nothing the coordinator can move on).
    pub(crate) fn failed(&self, why: String) {
        let mut g = self.lock();
        if !matches!(g.0, State::Released | State::Aborted(_)) {
            self.set(&mut g, State::Aborted(why));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short() -> Barrier {
        Barrier::new(Leases { cut: Duration::from_millis(50), go: Duration::from_millis(50) })
    }

    #[test]
    fn a_held_migration_goes_through_ready_cut_switched_released() {
        let b = short();
        assert_eq!(b.cut(), Err(Refused(State::Preparing)), "not cut before it is ready");
        assert_eq!(b.wait_cut(Duration::from_millis(1)), Heard::NotYet);
        b.ready();
        assert_eq!(b.go(), Err(Refused(State::Ready)), "no go before the switch");
        b.cut().unwrap();
        assert_eq!(b.cut(), Err(Refused(State::Cut)), "one cut");
        assert_eq!(b.wait_cut(Duration::from_millis(1)), Heard::Yes);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.switched_wait_go());
            while b.state() != State::Switched {
                std::thread::yield_now();
            }
            b.go().unwrap();
            assert_eq!(waiter.join().unwrap(), Heard::Yes);
        });
        assert_eq!(b.state(), State::Released);
        assert!(b.abort("late").is_err(), "a released guest is not aborted");
    }

    #[test]
    fn leases_run_out_so_a_dead_coordinator_strands_nobody() {
        let b = short();
        b.ready();
        let t = Instant::now();
        while b.wait_cut(Duration::from_millis(5)) == Heard::NotYet {
            assert!(t.elapsed() < Duration::from_secs(5));
        }
        assert!(matches!(b.state(), State::Aborted(r) if r.contains("did not cut")));
        assert!(b.cut().is_err(), "a late cut is refused");

        let b = short();
        b.ready();
        b.cut().unwrap();
        assert!(matches!(b.switched_wait_go(), Heard::No(r) if r.contains("did not say go")));
        assert!(b.go().is_err(), "a late go is refused: that checkpoint belongs to no group");
    }

    #[test]
    fn an_abort_is_heard_before_and_after_the_switch() {
        let b = short();
        b.ready();
        b.abort("member m1 died").unwrap();
        assert!(matches!(b.wait_cut(Duration::from_millis(1)), Heard::No(r) if r.contains("m1 died")));
        let b = short();
        b.ready();
        b.cut().unwrap();
        b.abort("member m1 died").unwrap();
        assert!(matches!(b.switched_wait_go(), Heard::No(_)));
        let b = short();
        b.failed("the destination went away".into());
        assert_eq!(b.abort("x"), Err(Refused(State::Aborted("the destination went away".into()))));
    }
}
