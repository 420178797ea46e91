//! What the polled certificate folders share: a fingerprint of a folder's
//! files, to load only what changed, and the rule for reporting a failed
//! load (the second time the same content fails, once), since issuers and
//! rotations write several files one after the other.

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::Path,
};

/// A hash of the files `names` in `dir` as they are now (missing ones too).
pub fn fingerprint(dir: &Path, names: &[&str]) -> u64 {
    let mut h = DefaultHasher::new();
    for name in names {
        std::fs::read(dir.join(name)).ok().hash(&mut h);
    }
    h.finish()
}

/// The content that failed to load last, and whether that was reported.
#[derive(Debug, Default)]
pub struct Failure(Option<(u64, bool)>);

impl Failure {
    /// Records that the content `fingerprint` failed to load; true when it
    /// is to be reported now: it failed on the previous look too, and was
    /// not reported yet.
    pub fn seen(&mut self, fingerprint: u64) -> bool {
        match &mut self.0 {
            Some((fp, reported)) if *fp == fingerprint => !std::mem::replace(reported, true),
            _ => {
                self.0 = Some((fingerprint, false));
                false
            }
        }
    }
}
