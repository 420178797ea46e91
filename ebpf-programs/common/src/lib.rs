//! Map keys, values and names shared by the kernel programs and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding fields and no implicit
//! padding: the kernel sees the same bytes the agent writes, and BTF carries
//! the field names `bpftool map dump` prints. Layouts are checked at compile
//! time below and against the built object's BTF in the agent's tests.
#![no_std]

pub mod maps;

pub use maps::*;
