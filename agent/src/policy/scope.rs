//! Which policy of a level applies to a pod, for the kinds Istio resolves
//! by the most specific level (PeerAuthentication, Telemetry): a workload's
//! policy selects pods by labels, a namespace's or the mesh's has no
//! selector; of two at one level, the older one wins, then the first by
//! name (a policy from the config folder has no time and ranks by name
//! alone).

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

/// A policy placed by a selector, with its age.
pub trait Scoped {
    fn name(&self) -> &str;
    fn selector(&self) -> Option<&BTreeMap<String, String>>;
    fn created(&self) -> Option<Timestamp>;
}

/// Of `policies` (one namespace's), the one that decides at a level: with
/// `labels`, the workload level (those whose selector selects a pod with
/// them); without, the namespace level (those without a selector).
pub fn oldest<'p, P: Scoped + 'p>(
    policies: impl IntoIterator<Item = &'p P>,
    labels: Option<&BTreeMap<String, String>>,
) -> Option<&'p P> {
    policies
        .into_iter()
        .filter(|p| match (p.selector(), labels) {
            (None, None) => true,
            (Some(selector), Some(labels)) => super::authz::selector_matches(selector, labels),
            _ => false,
        })
        .min_by(|a, b| (a.created(), a.name()).cmp(&(b.created(), b.name())))
}
