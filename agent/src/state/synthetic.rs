//! A synthetic cluster, as YAML a state folder could hold: what the state
//! benchmarks measure (`benches/state.rs` for the build and the lookups,
//! `cargo xtask bench --only scale` for a running agent). 100 namespaces,
//! each with 20 Services of 10 pods spread over 50 nodes named `n0`..`n49`,
//! 5 ALLOW AuthorizationPolicies (one Service's pods each, from the
//! namespace's own pods) and 2 HTTPRoutes (each splitting one Service's
//! calls between two others).

use std::fmt::Write as _;

pub const NAMESPACES: usize = 100;
pub const SERVICES_PER_NAMESPACE: usize = 20;
pub const PODS_PER_SERVICE: usize = 10;
pub const POLICIES_PER_NAMESPACE: usize = 5;
pub const ROUTES_PER_NAMESPACE: usize = 2;
/// Pods in all.
pub const PODS: usize = NAMESPACES * SERVICES_PER_NAMESPACE * PODS_PER_SERVICE;

/// Service `svc-<svc>` of namespace `ns-<ns>`'s cluster IP.
pub fn vip(ns: usize, svc: usize) -> String {
    format!("10.96.{ns}.{}", svc + 10)
}

/// Pod `svc-<svc>-<pod>` of namespace `ns-<ns>`'s address.
pub fn pod_ip(ns: usize, svc: usize, pod: usize) -> String {
    let i = svc * PODS_PER_SERVICE + pod;
    format!("10.{}.{}.{}", 100 + ns / 100, ns % 100, i + 10)
}

/// The cluster's objects. With `slices`, each Service's endpoints come from
/// an EndpointSlice (as in Kubernetes), else from its selector (as in a
/// state folder). Pods look as the API server shows them: a uid, a
/// ReplicaSet's hash label, two containers, phase and Ready.
pub fn cluster_yaml(slices: bool) -> String {
    let mut yaml = String::new();
    for ns in 0..NAMESPACES {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, labels: {{trellis.dev/mesh: enabled}}}}\n"
        );
        for p in 0..POLICIES_PER_NAMESPACE {
            let _ = write!(
                yaml,
                "---\napiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{p}, namespace: ns-{ns}}}\n\
                 spec: {{selector: {{matchLabels: {{app: svc-{p}}}}}, action: ALLOW, rules: [{{from: [{{source: {{namespaces: [ns-{ns}]}}}}]}}]}}\n"
            );
        }
        for r in 0..ROUTES_PER_NAMESPACE {
            let _ = write!(
                yaml,
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r-{r}, namespace: ns-{ns}}}\n\
                 spec: {{parentRefs: [{{group: '', kind: Service, name: svc-{r}, port: 80}}], rules: [{{matches: [{{path: {{type: PathPrefix, value: /v2}}}}], \
                 backendRefs: [{{name: svc-{}, port: 80, weight: 90}}, {{name: svc-{}, port: 80, weight: 10}}]}}]}}\n",
                r + 10,
                r + 11
            );
        }
        for svc in 0..SERVICES_PER_NAMESPACE {
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{svc}, namespace: ns-{ns}}}\n\
                 spec: {{clusterIP: {}, selector: {{app: svc-{svc}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n",
                vip(ns, svc)
            );
            let mut endpoints = Vec::new();
            for pod in 0..PODS_PER_SERVICE {
                let ip = pod_ip(ns, svc, pod);
                let _ = write!(
                    yaml,
                    "---\napiVersion: v1\nkind: Pod\n\
                     metadata: {{name: svc-{svc}-{pod}, namespace: ns-{ns}, uid: 6d1c2f3e-{ns:04}-{svc:04}-{pod:04}-000000000000, \
                     labels: {{app: svc-{svc}, pod-template-hash: 5d4f8c7b9}}}}\n\
                     spec: {{nodeName: n{}, serviceAccountName: svc-{svc}, containers: [\
                     {{name: app, image: registry.example/app:1.0, ports: [{{name: http, containerPort: 8080}}]}}, \
                     {{name: log, image: registry.example/log:2.1}}]}}\n\
                     status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}], conditions: [{{type: Ready, status: 'True'}}]}}\n",
                    (ns + pod) % 50
                );
                endpoints.push(format!(
                    "{{addresses: [{ip}], conditions: {{ready: true}}}}"
                ));
            }
            if slices {
                let _ = write!(
                    yaml,
                    "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata: {{name: svc-{svc}-1, namespace: ns-{ns}, labels: {{kubernetes.io/service-name: svc-{svc}}}}}\n\
                     addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
                    endpoints.join(", ")
                );
            }
        }
    }
    yaml
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::state::{Snapshot, objects::parse_file};

    #[test]
    fn the_cluster_parses_and_builds() {
        for slices in [false, true] {
            let parsed =
                parse_file(Path::new("cluster.yaml"), &cluster_yaml(slices)).expect("yaml");
            assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
            let snap = Snapshot::build("n1", &parsed.objects);
            assert_eq!(snap.workloads.len(), PODS);
            let vip = format!("{}:80", vip(99, 19)).parse().expect("addr");
            let (svc, _) = snap.service_for(vip).expect("the last Service");
            assert_eq!(svc.backends[&80].len(), PODS_PER_SERVICE);
        }
    }
}
