//! The agent's proxies: outbound capture on 15001, and the relay they share.

pub mod outbound;
pub mod relay;
