//! The privileged test harness: real topologies on this kernel.
//!
//! A [`Lab`] is one test's world: a *node* is a network namespace, a *pod* is
//! a network namespace with a veth pair to its node, an address, a default
//! route via the node and its own cgroup v2 folder under the node's cgroup
//! root. Nodes hang off a bridge in a fabric namespace, so a pod on node A
//! reaches a pod on node B by IP. Nothing touches the root namespace's
//! network: every address lives in namespaces the lab made.
//!
//! Every object carries the lab's unique id (test process id and a counter)
//! and is removed when the lab drops, also when the test panics; labs left by
//! a killed test process are swept when the next lab starts.
#![expect(unsafe_code, reason = "setns and cgroup joins in pre_exec")]

pub mod agent;
pub mod lab;
pub mod mesh;
pub mod process;
pub mod py;
pub mod sys;

pub use agent::{Agent, Usage, trellis_bin, uninstall};
pub use lab::{Lab, Node, Pod};
pub use process::{ChildGuard, Exec};

/// Fails unless the tier can really run here: root, cgroup v2, bpffs.
/// CI runs as root, so a missing privilege is a failure, never a skip.
pub fn require_privileges() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the privileged tier needs root (network namespaces, cgroups, BPF): run `sudo cargo xtask test`"
    );
}
