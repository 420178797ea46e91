//! L7 routing: the Gateway API's `HTTPRoute` and `GRPCRoute` as a mesh uses
//! them (GAMMA), read from the config objects and compiled into a
//! per-Service-port table the HTTP proxy consults on every request.

pub mod cors;
pub mod grpc_route;
pub mod http_route;
pub mod reference_grant;
pub mod session;
pub mod table;

#[cfg(test)]
mod reference;

pub use table::{Entry, PortRoutes, RequestView, RouteTable, Rule, route};
