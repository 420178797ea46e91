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
pub mod counters;
pub mod lab;
pub mod mesh;
pub mod process;
pub mod prometheus;
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

/// Every cgroup program the agent attaches to its cgroup root, sorted (as
/// [`sys::cgroup_program_names`] lists them).
pub const CGROUP_PROGRAMS: [&str; 7] = [
    "trl_connect4",
    "trl_connect6",
    "trl_getpeer4",
    "trl_getpeer6",
    "trl_sendmsg4",
    "trl_sendmsg6",
    "trl_sock_ops",
];

/// Waits until `check` holds, polling every 200 ms; fails with `what` after
/// `limit`.
pub fn eventually(what: &str, limit: std::time::Duration, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
