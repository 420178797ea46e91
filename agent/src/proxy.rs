//! The agent's proxies. `outbound`: connections the kernel captured from
//! local pods, on 15001.

pub mod outbound;
