//! The Trellis CRDs (`trellis.dev/v1alpha1`), generated from the Rust types
//! the agent parses (`#[derive(CustomResource, JsonSchema)]` on each spec),
//! so the schema the API server enforces and the code that reads the
//! objects cannot drift apart. `trellis crds` prints them; `trellis crds
//! --dir deploy/helm/trellis/crds` rewrites the chart's copies, and a test
//! fails when those differ from what the types generate.

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;

use crate::{
    policy::{
        authn::RequestAuthentication, authz::AuthorizationPolicy, peer_auth::PeerAuthentication,
        telemetry::Telemetry,
    },
    resilience::TrafficPolicy,
    state::service_entry::ServiceEntry,
};

/// Where the chart keeps them, from the repository root.
pub const CHART_DIR: &str = "deploy/helm/trellis/crds";

/// Every CRD of the project.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        AuthorizationPolicy::crd(),
        RequestAuthentication::crd(),
        PeerAuthentication::crd(),
        Telemetry::crd(),
        ServiceEntry::crd(),
        TrafficPolicy::crd(),
    ]
}

/// A CRD's file name: its singular name.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    let names = &crd.spec.names;
    let singular = names
        .singular
        .clone()
        .unwrap_or_else(|| names.kind.to_lowercase());
    format!("{singular}.yaml")
}

/// A CRD as YAML, with a header saying where it comes from.
pub fn render(crd: &CustomResourceDefinition) -> String {
    let yaml = serde_yaml_ng::to_string(crd).expect("a CRD serializes");
    format!(
        "# Generated from the agent's Rust types by `trellis crds --dir {CHART_DIR}`;\n\
         # do not edit (a test fails when this file differs from what they generate).\n\
         {yaml}"
    )
}

/// Writes every CRD into `dir`, one file each.
pub fn write_all(dir: &Path) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    all()
        .iter()
        .map(|crd| {
            let name = file_name(crd);
            std::fs::write(dir.join(&name), render(crd))?;
            Ok(name)
        })
        .collect()
}

/// Schemas for the fields whose shape a derive cannot say.
pub mod schema {
    use std::borrow::Cow;

    use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

    /// A Gateway API duration (`500ms`, `2s`, `1m`, `1h`, `1h30m`).
    pub const DURATION: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

    /// A port written as a number or a string of digits (Istio writes
    /// strings): Kubernetes' int-or-string.
    pub struct PortNumber;

    impl JsonSchema for PortNumber {
        fn schema_name() -> Cow<'static, str> {
            "PortNumber".into()
        }

        fn inline_schema() -> bool {
            true
        }

        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            // Value checks at the top: each applies to one of the two types
            // (inside an `anyOf` without types they would let anything pass).
            json_schema!({
                "x-kubernetes-int-or-string": true,
                "minimum": 1,
                "maximum": 65535,
                "pattern": "^[0-9]+$"
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart's CRDs are the ones the types generate; with
    /// `TRELLIS_BLESS=1` the test rewrites them instead.
    #[test]
    fn chart_crds_are_generated_from_the_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CHART_DIR);
        if std::env::var_os("TRELLIS_BLESS").is_some() {
            write_all(&dir).expect("writing the CRDs");
        }
        let mut expected: Vec<String> = all().iter().map(file_name).collect();
        expected.sort();
        let mut present: Vec<String> = std::fs::read_dir(&dir)
            .expect("the chart's crds folder")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        present.sort();
        assert_eq!(present, expected, "files in {CHART_DIR}");
        for crd in all() {
            let path = dir.join(file_name(&crd));
            let committed = std::fs::read_to_string(&path).expect("read");
            assert!(
                committed == render(&crd),
                "{} differs from the Rust types: run `cargo run -p trellis-agent -- crds --dir {CHART_DIR}` \
                 (or TRELLIS_BLESS=1 cargo test -p trellis-agent crds) and commit the result",
                path.display()
            );
        }
    }

    #[test]
    fn structural_schemas_with_printer_columns() {
        for crd in all() {
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, "v1alpha1");
            let schema = serde_json::to_value(&version.schema).expect("schema");
            let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
            assert_eq!(spec["type"], "object", "{}", crd.spec.names.kind);
            assert!(
                version
                    .additional_printer_columns
                    .as_ref()
                    .is_some_and(|c| !c.is_empty()),
                "{} has printer columns",
                crd.spec.names.kind
            );
            // Structural: no references left, every property typed or int-or-string.
            assert!(!schema.to_string().contains("$ref"), "{schema}");
        }
    }
}
