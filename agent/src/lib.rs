//! The Trellis node agent: loads and attaches the kernel programs, serves
//! health, and (as later modules land) captures, secures and routes pod
//! traffic. `main.rs` is only the CLI's edge; everything else lives here so the
//! end-to-end tests drive the same code.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod bpf;
pub mod cel;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod crds;
pub mod flows;
pub mod handoff;
pub mod hbone;
pub mod identity;
pub mod inspect;
pub mod memory;
pub mod metrics;
pub mod netlink;
#[expect(unsafe_code, reason = "setns and getsockopt(SO_NETNS_COOKIE)")]
pub mod netns;
pub mod policy;
pub mod protobuf;
pub mod proxy;
pub mod query;
pub mod resilience;
pub mod routes;
pub mod run;
#[expect(unsafe_code, reason = "setsockopt")]
pub mod sockopt;
pub mod state;
pub mod sync;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod trace;
