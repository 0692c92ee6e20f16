//! Incremental checkpoints of a running instance: which pages a checkpoint
//! holds. The instance keeps the pages written since its last checkpoint
//! (`vmm::Instance::track_dirty_pages`: KVM's dirty log, kept on between
//! checkpoints, and the VMM's own writes); an incremental checkpoint holds
//! just those and names the last one as its parent (the snapshot crate's
//! chain). The caller keeps the [`Base`] of the last committed checkpoint and,
//! once a checkpoint committed, tells the instance which pages it holds now
//! ([`Tracked`]), so that a failed checkpoint loses nothing: its pages go
//! into the next one.

use std::path::{Path, PathBuf};

use snapshot::{MemoryLayout, PageBitmap, ParentRef};
use vmm::Instance;

use crate::Result;

/// The last committed checkpoint of an instance whose written pages are
/// tracked: what its next incremental checkpoint builds on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Base {
    pub dir: PathBuf,
    /// Its manifest's `id`.
    pub id: String,
    /// The tracking it belongs to (`vmm::Instance::dirty_epoch`): another
    /// tracking (a new instance, a migration in between) cannot build on it.
    pub epoch: u64,
    /// The directories it needs: its own and its parents'.
    pub chain: Vec<PathBuf>,
}

impl Base {
    /// The base a checkpoint committed into `dir` (with `id`) makes, on
    /// `parent` if it is incremental.
    pub fn after(dir: &Path, id: &str, epoch: u64, parent: Option<&Base>) -> Base {
        let mut chain = parent.map(|p| p.chain.clone()).unwrap_or_default();
        chain.push(dir.to_path_buf());
        Base { dir: dir.to_path_buf(), id: id.to_string(), epoch, chain }
    }

    /// Whether a checkpoint committed into `dir` replaces one it needs.
    pub fn needs(&self, dir: &Path) -> bool {
        self.chain.iter().any(|d| d == dir)
    }
}

/// Which pages a checkpoint holds.
#[derive(Clone, Copy, Debug, Default)]
pub enum Pages<'a> {
    /// All of memory, and nothing is tracked for it.
    #[default]
    All,
    /// Only those written since `base`, when it is this instance's current
    /// tracking's; else all of them, and the tracking starts (again) here.
    SinceBase(Option<&'a Base>),
}

/// What an incremental request became: the tracking, and the pages the
/// checkpoint takes off the instance's account once committed.
#[derive(Clone, Debug, Default)]
pub struct Tracked {
    pub epoch: u64,
    /// Per RAM range, the pages harvested for it (None: tracking began with it).
    pub pages: Option<Vec<Vec<u64>>>,
}

/// An incremental checkpoint's memory: its parent and the pages it holds.
pub(crate) struct Increment {
    pub parent: ParentRef,
    pub pages: PageBitmap,
}

/// Ahead of an incremental checkpoint's pause, while the guest runs: KVM's
/// dirty-log work that does not need the pause is done now
/// (`vmm::Instance::prepare_dirty_pages`), so that the pause harvests only the
/// pages written since. Nothing for a checkpoint of all of memory, or for an
/// instance the user paused (the guest loses no time to the checkpoint's pause).
pub(crate) fn prepare(instance: &Instance, pages: Pages<'_>) -> Result<()> {
    if matches!(pages, Pages::SinceBase(_)) && instance.run_state() == vmm::instance::RunState::Running {
        instance.prepare_dirty_pages()?;
    }
    Ok(())
}

/// Decides, the instance paused, what a checkpoint into `out` by `pages`
/// holds: `None` for all of memory, else its increment. Returns what to keep
/// for the commit.
pub(crate) fn plan(
    instance: &Instance,
    pages: Pages<'_>,
    layout: &MemoryLayout,
    out: &Path,
) -> Result<(Option<Increment>, Option<Tracked>)> {
    let Pages::SinceBase(base) = pages else { return Ok((None, None)) };
    let Some(epoch) = instance.dirty_epoch() else {
        instance.track_dirty_pages()?;
        let epoch = instance.dirty_epoch().expect("tracked from now on");
        return Ok((None, Some(Tracked { epoch, pages: None })));
    };
    let written = instance.dirty_pages()?.expect("tracked");
    let tracked = Tracked { epoch, pages: Some(written.clone()) };
    // It builds on the base only from the same tracking, beside it (a
    // sibling: a series' checkpoints build on the series', others on their
    // neighbours), and never over a checkpoint the base needs.
    let base = base.filter(|b| b.epoch == epoch && b.dir.parent() == out.parent() && !b.needs(out));
    let Some(b) = base else { return Ok((None, Some(tracked))) };
    let dir = b.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let increment =
        Increment { parent: ParentRef { dir, id: b.id.clone() }, pages: PageBitmap::from_regions(layout, &written) };
    Ok((Some(increment), Some(tracked)))
}

/// The data extents of an increment's memory source, region by region.
pub(crate) fn extents(inc: &Increment, layout: &MemoryLayout) -> Vec<Vec<std::ops::Range<u64>>> {
    (0..layout.regions.len()).map(|k| inc.pages.extents_in(layout, k)).collect()
}
