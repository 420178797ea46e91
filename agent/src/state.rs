//! The state model: Kubernetes objects from a source (a folder of YAML
//! files, or the API server), and the view derived from them.

pub mod files;
pub mod kube;
pub mod memo;
pub mod model;
#[cfg(test)]
mod mutated;
pub mod objects;
pub mod pace;
pub mod retire;
pub mod service_entry;
pub mod synthetic;

pub use self::model::{Backend, NodeInfo, ServiceView, Snapshot, Workload};
pub use self::objects::{Object, ObjectError, ObjectKey};

/// Where objects come from.
pub enum Source {
    Files(files::FileSource),
    Kubernetes(kube::KubeSource),
}

/// What the source's health shows in metrics and `trellis status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SourceStats {
    /// The config folder's reloads.
    pub reloads: files::ReloadStats,
    /// The API source's counts.
    pub kubernetes: Option<kube::KubeStats>,
    /// How long the API server has been failing (0 while it answers).
    pub stale_seconds: f64,
    /// What rebuilding the snapshot has cost, kept by the state thread.
    pub rebuilds: pace::RebuildStats,
}

impl Source {
    /// Every object, when something changed.
    pub fn poll(&mut self) -> Option<Vec<Object>> {
        match self {
            Self::Files(f) => f.poll(),
            Self::Kubernetes(k) => k.poll(),
        }
    }

    pub fn stats(&self) -> SourceStats {
        match self {
            Self::Files(f) => SourceStats {
                reloads: f.stats(),
                ..SourceStats::default()
            },
            Self::Kubernetes(k) => SourceStats {
                kubernetes: Some(k.stats()),
                stale_seconds: k.stale_for().map_or(0.0, |(d, _)| d.as_secs_f64()),
                ..SourceStats::default()
            },
        }
    }

    /// What keeps the source from being current, for the readiness detail
    /// (the state stays served): kinds not listed yet, or the API server
    /// failing for over `grace`.
    pub fn trouble(&self, grace: std::time::Duration) -> Option<String> {
        let Self::Kubernetes(k) = self else {
            return None;
        };
        let waiting = k.waiting_for();
        if !waiting.is_empty() {
            return Some(format!(
                "waiting for the API server's first list of {}",
                waiting.join(", ")
            ));
        }
        let (stale, error) = k.stale_for().filter(|(d, _)| *d > grace)?;
        Some(format!(
            "stale: the API server has failed for {}s ({error}); the last known state keeps serving",
            stale.as_secs()
        ))
    }
}
