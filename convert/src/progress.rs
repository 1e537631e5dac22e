//! Progress reporting from conversion to whatever shows it (the CLI's progress bars).

/// Something that happened during a conversion.
#[derive(Debug, Clone)]
pub enum Event {
    /// A layer started converting; `size` is its compressed source size.
    LayerStarted { digest: String, size: u64 },
    /// Compressed source bytes of a layer read so far.
    LayerRead { digest: String, bytes: u64 },
    /// A layer is converted and stored.
    LayerDone { digest: String },
    /// A layer was left as it was (already in Arbor's format).
    LayerKept { digest: String },
    /// A line worth showing the user.
    Message(String),
}

/// Receives [`Event`]s; called from worker threads.
pub trait Progress: Send + Sync {
    fn event(&self, e: Event);
}

/// Discards events.
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _: Event) {}
}
