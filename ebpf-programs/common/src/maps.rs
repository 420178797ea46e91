//! Map names, keys and values. One section per map.

use core::mem::{offset_of, size_of};

/// Bumped whenever a pinned map's key or value layout changes, so an agent
/// never misreads a map pinned by an incompatible version: it is kept in
/// [`MAP_LAYOUT`], and an agent that finds another one there (or none)
/// makes its maps anew.
pub const LAYOUT_VERSION: u32 = 5;

/// One `u32`: the [`LAYOUT_VERSION`] of the maps pinned beside it.
pub const MAP_LAYOUT: &str = "layout";

/// Every map the kernel object defines; the agent pins each one by this name
/// under `<bpffs>/maps/`.
pub const ALL_MAPS: &[&str] = &[
    MAP_LAYOUT,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_ENDPOINTS,
    MAP_SERVICES,
    MAP_IPCACHE,
    MAP_ORIG_BY_COOKIE,
    MAP_ORIG_BY_TUPLE,
    MAP_SOCKETS,
    MAP_SOCK_STATE,
    MAP_POD_IFACES,
    MAP_POLICY,
    MAP_CONNTRACK,
    MAP_FLOWS,
];

// Programs; each one's link is pinned under `<bpffs>/links/<name>`.
pub const PROG_CONNECT4: &str = "trl_connect4";
pub const PROG_CONNECT6: &str = "trl_connect6";
pub const PROG_GETPEERNAME4: &str = "trl_getpeer4";
pub const PROG_GETPEERNAME6: &str = "trl_getpeer6";
/// Unconnected UDP sends: egress policy per datagram.
pub const PROG_SENDMSG4: &str = "trl_sendmsg4";
pub const PROG_SENDMSG6: &str = "trl_sendmsg6";
pub const PROG_SOCK_OPS: &str = "trl_sock_ops";
/// The sk_msg program, attached to [`MAP_SOCKETS`] (its link is pinned too).
pub const PROG_SK_MSG: &str = "trl_sk_msg";
/// TC ingress (tcx) on the node's uplink: steers HBONE (`<pod IP>:15008`)
/// into the agent's transparent listener.
pub const PROG_HBONE_IN: &str = "trl_hbone_in";
/// tcx egress on a local pod's host-side interface (packets to the pod):
/// ingress policy, STRICT mTLS.
pub const PROG_POD_TO: &str = "trl_pod_to";
/// tcx ingress on a local pod's host-side interface (packets from the pod):
/// source address check, egress policy, replies to the agent's
/// source-preserving sockets.
pub const PROG_POD_FROM: &str = "trl_pod_from";

/// The HBONE port, on every meshed pod's IP.
pub const HBONE_PORT: u16 = 15008;
/// `skb->mark` bit `trl_hbone_in` sets on steered packets; a policy rule
/// sends marked packets to a table whose default route is local, so the
/// kernel delivers them to the assigned socket instead of forwarding them.
pub const HBONE_MARK: u32 = 0x0001_5008;
/// The routing table of that rule (and its priority).
pub const HBONE_TABLE: u32 = 15008;
/// `SO_MARK` bit on the agent's sockets towards local pods: TC knows the
/// agent by it, never by address (every process of the node shares those).
/// Pods cannot forge it: the kernel clears marks when a packet crosses into
/// another network namespace, and the pod programs clear it too.
pub const AGENT_MARK: u32 = 0x0800_0000;

// === counters ===

/// Per-CPU event counters, by hook, verdict and reason.
pub const MAP_COUNTERS: &str = "counters";
pub const COUNTERS_MAX_ENTRIES: u32 = 4096;

/// Which kernel hook counted the event.
pub mod hook {
    pub const CONNECT4: u32 = 1;
    pub const CONNECT6: u32 = 2;
    pub const SENDMSG4: u32 = 3;
    pub const SENDMSG6: u32 = 4;
    pub const SOCK_OPS: u32 = 5;
    pub const SK_MSG: u32 = 6;
    pub const TC_INGRESS: u32 = 7;
    pub const TC_EGRESS: u32 = 8;
    pub const GETPEERNAME4: u32 = 9;
    pub const GETPEERNAME6: u32 = 10;

    /// Name used by the CLI and metrics.
    pub const fn name(hook: u32) -> &'static str {
        match hook {
            CONNECT4 => "connect4",
            CONNECT6 => "connect6",
            SENDMSG4 => "sendmsg4",
            SENDMSG6 => "sendmsg6",
            SOCK_OPS => "sock_ops",
            SK_MSG => "sk_msg",
            TC_INGRESS => "tc_ingress",
            TC_EGRESS => "tc_egress",
            GETPEERNAME4 => "getpeername4",
            GETPEERNAME6 => "getpeername6",
            _ => "unknown",
        }
    }
}

/// What the hook did.
pub mod verdict {
    /// Left the socket or packet as it was.
    pub const PASS: u32 = 0;
    /// Rewrote the destination to the agent (connect), or moved the data
    /// straight into another socket (sk_msg).
    pub const REDIRECT: u32 = 1;
    /// Refused (EPERM at connect, drop at TC).
    pub const DENY: u32 = 2;

    pub const fn name(verdict: u32) -> &'static str {
        match verdict {
            PASS => "pass",
            REDIRECT => "redirect",
            DENY => "deny",
            _ => "unknown",
        }
    }
}

/// Why the hook did it.
pub mod reason {
    /// The socket's network namespace is not a meshed endpoint.
    pub const NOT_MESHED: u32 = 0;
    /// The destination is not in the mesh.
    pub const NOT_MESH_DESTINATION: u32 = 1;
    /// A meshed endpoint connecting to a mesh destination.
    pub const CAPTURED: u32 = 2;
    /// Not TCP (or not a protocol the hook handles).
    pub const OTHER_PROTOCOL: u32 = 3;
    /// A mesh destination, but the agent has no capture address yet.
    pub const NO_CAPTURE_ADDRESS: u32 = 4;
    /// sock_ops indexed a captured connection's original destination.
    pub const INDEXED: u32 = 5;
    /// getpeername() answered with the original destination.
    pub const ORIGINAL_PEER: u32 = 6;
    /// sock_ops put the socket into the sockhash.
    pub const SOCKHASH_ADDED: u32 = 7;
    /// sk_msg moved the data into the socket at the other end of the
    /// connection (app ↔ agent, agent ↔ local pod), around the TCP/IP stack.
    pub const TO_PEER: u32 = 8;
    /// sk_msg moved the data into the socket the agent spliced this one to
    /// (app ↔ backend), around the agent.
    pub const SPLICED: u32 = 9;
    /// sk_msg let the data take the TCP path: the socket at the other end is
    /// not in the sockhash yet, or has earlier bytes still unread.
    pub const CATCHING_UP: u32 = 10;
    /// TC steered an HBONE packet to the agent's socket.
    pub const HBONE_STEERED: u32 = 11;
    /// An HBONE packet for a local pod, but no agent socket to take it.
    pub const HBONE_NO_LISTENER: u32 = 12;
    /// A plaintext connection to a STRICT pod from outside the node's own
    /// stack (another pod, another node): dropped.
    pub const PLAINTEXT_IN_STRICT: u32 = 13;
    /// A pod's reply to the agent's source-preserving socket, steered to it.
    pub const REPLY_TO_AGENT: u32 = 15;
    /// No network policy selects the endpoint in this direction: not isolated.
    pub const NOT_ISOLATED: u32 = 16;
    /// A network policy rule allows it.
    pub const POLICY_ALLOWED: u32 = 17;
    /// The endpoint is isolated and no rule allows it.
    pub const POLICY_DENIED: u32 = 18;
    /// A packet of a connection already allowed (connection tracking).
    pub const ESTABLISHED: u32 = 19;
    /// A reply within a connection allowed the other way.
    pub const REPLY: u32 = 20;
    /// From or to this node's own addresses: always allowed (Kubernetes).
    pub const HOST: u32 = 21;
    /// Sent by the agent, which judged the connection itself.
    pub const FROM_AGENT: u32 = 22;
    /// A packet from a pod whose source address is not the pod's own.
    pub const SPOOFED_SOURCE: u32 = 23;
    /// IPv6 neighbour discovery and ICMP errors: needed for the link and path to work.
    pub const CONTROL: u32 = 24;
    /// A pod connecting to its own address: loopback, never judged (Kubernetes).
    pub const SELF: u32 = 25;
    /// Not a decision: a flow event the ring buffer had no room for (the
    /// decision itself is counted under its own reason as well).
    pub const FLOW_EVENT_LOST: u32 = 26;
    /// sk_msg: the socket the bytes were for held more unread bytes than
    /// [`super::SK_MSG_BACKLOG_MAX`]; they take TCP, whose windows hold the
    /// sender back.
    pub const BACKLOGGED: u32 = 27;
    /// The mesh allows calls to known destinations only
    /// ([`super::config_flags::REGISTRY_ONLY`]) and this one is none: not a
    /// Service or ServiceEntry address, nor a pod's or node's.
    pub const NOT_IN_REGISTRY: u32 = 28;

    pub const fn name(reason: u32) -> &'static str {
        match reason {
            NOT_MESHED => "not-meshed",
            NOT_MESH_DESTINATION => "not-mesh-destination",
            CAPTURED => "captured",
            OTHER_PROTOCOL => "other-protocol",
            NO_CAPTURE_ADDRESS => "no-capture-address",
            INDEXED => "indexed",
            ORIGINAL_PEER => "original-peer",
            SOCKHASH_ADDED => "sockhash-added",
            TO_PEER => "to-peer",
            SPLICED => "spliced",
            CATCHING_UP => "catching-up",
            HBONE_STEERED => "hbone-steered",
            HBONE_NO_LISTENER => "hbone-no-listener",
            PLAINTEXT_IN_STRICT => "plaintext-in-strict",
            REPLY_TO_AGENT => "reply-to-agent",
            NOT_ISOLATED => "not-isolated",
            POLICY_ALLOWED => "policy-allowed",
            POLICY_DENIED => "policy-denied",
            ESTABLISHED => "established",
            REPLY => "reply",
            HOST => "host",
            FROM_AGENT => "from-agent",
            SPOOFED_SOURCE => "spoofed-source",
            CONTROL => "control",
            SELF => "self",
            FLOW_EVENT_LOST => "flow-event-lost",
            BACKLOGGED => "backlogged",
            NOT_IN_REGISTRY => "not-in-registry",
            _ => "unknown",
        }
    }
}

/// Key of [`MAP_COUNTERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    /// One of [`hook`].
    pub hook: u32,
    /// One of [`verdict`].
    pub verdict: u32,
    /// One of [`reason`].
    pub reason: u32,
    /// The endpoint the event belongs to; 0 when the socket is not a meshed endpoint.
    pub endpoint_id: u32,
}

/// Value of [`MAP_COUNTERS`] (per CPU: the reader sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    /// Number of events.
    pub events: u64,
    /// Bytes, where the hook sees them (TC, sk_msg); 0 elsewhere.
    pub bytes: u64,
}

// === endpoints ===

/// Meshed local pods, by network namespace cookie.
pub const MAP_ENDPOINTS: &str = "endpoints";
pub const ENDPOINTS_MAX_ENTRIES: u32 = 1024;

/// Bits of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// The pod's traffic is captured by the agent.
    pub const MESHED: u32 = 1 << 0;
    /// mTLS STRICT: plaintext from outside the mesh is dropped.
    pub const STRICT: u32 = 1 << 1;
}

/// Key of [`MAP_ENDPOINTS`]: the pod's network namespace cookie (SO_NETNS_COOKIE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub netns_cookie: u64,
}

/// Value of [`MAP_ENDPOINTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The agent's id for the endpoint, stable while the pod lives.
    pub endpoint_id: u32,
    /// The numeric security identity of the pod's labels and namespace.
    pub identity: u32,
    /// [`endpoint_flags`] bits.
    pub flags: u32,
    /// Host-side interface index of the pod's veth.
    pub ifindex: u32,
}

// === addresses ===

/// An IP address and port as map keys and values carry them: the address in
/// network byte order, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), so one
/// key type serves both families; the port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPort {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}

impl IpPort {
    /// From an IPv4 address in network byte order (as `bpf_sock_addr.user_ip4`
    /// holds it in memory) and a host-order port.
    #[inline(always)]
    pub const fn v4(addr: [u8; 4], port: u16) -> Self {
        Self {
            addr: ipv4_mapped(addr),
            port,
            _pad: 0,
        }
    }

    /// From an IPv6 address as the kernel's `__u32[4]` fields hold it (each
    /// word in network byte order) and a host-order port.
    #[inline(always)]
    pub const fn v6_words(w: [u32; 4], port: u16) -> Self {
        let (a, b, c, d) = (
            w[0].to_ne_bytes(),
            w[1].to_ne_bytes(),
            w[2].to_ne_bytes(),
            w[3].to_ne_bytes(),
        );
        Self {
            addr: [
                a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
                d[2], d[3],
            ],
            port,
            _pad: 0,
        }
    }

    /// The address as the kernel's `__u32[4]` fields hold it.
    #[inline(always)]
    pub const fn words(&self) -> [u32; 4] {
        let a = self.addr;
        [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ]
    }

    /// The IPv4 address of an IPv4-mapped address, in network byte order
    /// (as `user_ip4` holds it in memory).
    #[inline(always)]
    pub const fn ip4(&self) -> [u8; 4] {
        [self.addr[12], self.addr[13], self.addr[14], self.addr[15]]
    }

    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        is_v4_mapped(&self.addr)
    }

    /// A loopback address: `127.0.0.0/8` (mapped) or `::1`.
    #[inline(always)]
    pub const fn is_loopback(&self) -> bool {
        let a = &self.addr;
        if self.is_v4_mapped() {
            return a[12] == 127;
        }
        let mut i = 0;
        while i < 15 {
            if a[i] != 0 {
                return false;
            }
            i += 1;
        }
        a[15] == 1
    }
}

/// Whether a 16-byte map address is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// Whether two 16-byte addresses are equal, word by word (BPF has no memcmp).
#[inline(always)]
pub const fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
            != u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
        {
            return false;
        }
        i += 4;
    }
    true
}

/// `::ffff:a.b.c.d`
#[inline(always)]
pub const fn ipv4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

// === config ===

/// One entry (index 0): settings the agent gives the kernel programs.
pub const MAP_CONFIG: &str = "config";

/// Bits of [`DatapathConfig::flags`].
pub mod config_flags {
    /// Captured connections are redirected to the agent (off: the hooks only count).
    pub const CAPTURE: u32 = 1 << 0;
    /// sock_ops adds the sockets of captured connections (and of the agent's
    /// connections to local pods) to the sockhash, where sk_msg redirects them.
    pub const SK_MSG: u32 = 1 << 1;
    /// The agent splices opaque same-node connections in the kernel
    /// (informational: the agent decides per connection).
    pub const SPLICE: u32 = 1 << 2;
    /// Istio's `outboundTrafficPolicy: REGISTRY_ONLY`: a meshed pod's TCP
    /// connect to an address the cluster does not know (no Service or
    /// ServiceEntry address, no pod's or node's) fails with EPERM.
    pub const REGISTRY_ONLY: u32 = 1 << 3;
}

/// Value of [`MAP_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Where captured IPv4 connections go: the node's InternalIP, network order.
    pub capture_ip4: [u8; 4],
    /// The capture port (15001), host order; 0 while the agent has none.
    pub capture_port: u16,
    pub _pad: u16,
    /// [`config_flags`] bits.
    pub flags: u32,
    /// Where captured IPv6 connections go: the node's IPv6 InternalIP; all
    /// zero when the node has none (IPv6 connects are then left alone).
    pub capture_ip6: [u8; 16],
    /// Bumped on every policy change: conntrack entries judged at an older
    /// revision are judged again.
    pub policy_revision: u32,
}

impl DatapathConfig {
    /// The capture address for a destination: IPv4-mapped destinations go to
    /// the IPv4 capture address, IPv6 ones to the IPv6 capture address.
    #[inline(always)]
    pub fn capture_for(&self, dst: &IpPort) -> Option<IpPort> {
        if self.capture_port == 0 {
            return None;
        }
        let addr = if dst.is_v4_mapped() {
            if self.capture_ip4 == [0; 4] {
                return None;
            }
            ipv4_mapped(self.capture_ip4)
        } else {
            if self.capture_ip6 == [0; 16] {
                return None;
            }
            self.capture_ip6
        };
        Some(IpPort {
            addr,
            port: self.capture_port,
            _pad: 0,
        })
    }
}

// === services ===

/// Service VIP:port → service, for every Service with a ClusterIP.
pub const MAP_SERVICES: &str = "services";
pub const SERVICES_MAX_ENTRIES: u32 = 16384;

/// Value of [`MAP_SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// The agent's id for the service.
    pub service_id: u32,
    /// Reserved for per-service data-path flags.
    pub flags: u32,
}

// === ipcache ===

/// LPM trie: IP (or CIDR) → identity, for every pod in the cluster.
pub const MAP_IPCACHE: &str = "ipcache";
pub const IPCACHE_MAX_ENTRIES: u32 = 65536;

/// Bits of [`IpInfo::flags`].
pub mod ip_flags {
    /// The address is a pod in the mesh: connections to it are captured.
    pub const MESHED: u32 = 1 << 0;
    /// The pod runs on this node: HBONE to it is steered to this agent.
    pub const LOCAL: u32 = 1 << 1;
    /// A local pod in STRICT mTLS mode: only the node's own stack (the agent,
    /// kubelet) may open connections to it.
    pub const STRICT: u32 = 1 << 2;
}

/// Value of [`MAP_IPCACHE`]; its key is an LPM key over the 16-byte address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpInfo {
    /// Numeric security identity: a pod's (labels + namespace), a node's
    /// ([`identity::HOST`], [`identity::REMOTE_NODE`]) or a CIDR's.
    pub identity: u32,
    /// [`ip_flags`] bits.
    pub flags: u32,
    /// For a pod or node address: the identity of the most specific policy
    /// CIDR holding it (0 when none), so `ipBlock` rules match in-cluster
    /// addresses too. For a CIDR entry, its own identity again.
    pub cidr_identity: u32,
}

/// Numeric security identities: reserved ones, and the ranges the agent
/// allocates from.
pub mod identity {
    /// In a policy key: any peer. In an event: not known.
    pub const ANY: u32 = 0;
    /// This node's own addresses (the node's stack, host-network pods).
    pub const HOST: u32 = 1;
    /// Any address the ipcache does not hold.
    pub const WORLD: u32 = 2;
    /// Another node's addresses.
    pub const REMOTE_NODE: u32 = 6;
    /// Pod identities (labels + namespace) are in `FIRST_POD..CIDR_BASE`.
    pub const FIRST_POD: u32 = 256;
    /// CIDR identities have this bit set.
    pub const CIDR_BASE: u32 = 1 << 24;
    /// Service VIPs, in egress policy keys only: [`service`].
    pub const SERVICE_BASE: u32 = 1 << 25;

    /// The policy identity of a service VIP: its egress entry exists when
    /// the endpoint may reach at least one of the service's backends.
    #[inline(always)]
    pub const fn service(service_id: u32) -> u32 {
        SERVICE_BASE | service_id
    }

    pub const fn reserved_name(id: u32) -> Option<&'static str> {
        match id {
            ANY => Some("any"),
            HOST => Some("host"),
            WORLD => Some("world"),
            REMOTE_NODE => Some("remote-node"),
            _ => None,
        }
    }
}

// === pod interfaces ===

/// Local pods by the ifindex of their host-side interface, for the TC programs.
pub const MAP_POD_IFACES: &str = "pod_ifaces";

/// Value of [`MAP_POD_IFACES`] (key: the host-side ifindex, u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodIface {
    pub endpoint_id: u32,
    pub identity: u32,
    /// [`endpoint_flags`] bits.
    pub flags: u32,
    /// The pod's IPv4 address (network order), all zero when it has none.
    pub ip4: [u8; 4],
    /// The pod's IPv6 address, all zero when it has none.
    pub ip6: [u8; 16],
    /// Ports whose mTLS mode is the other one than
    /// [`endpoint_flags::STRICT`] says (PeerAuthentication
    /// `portLevelMtls`); 0 is an unused slot.
    pub mtls_ports: [u16; MTLS_PORTS],
}

/// How many ports of a pod may have their own mTLS mode.
pub const MTLS_PORTS: usize = 8;

impl PodIface {
    /// Whether a new connection to `port` must come through the mesh: the
    /// pod's mode, turned over on the ports listed.
    #[inline(always)]
    pub fn strict_on(&self, port: u16) -> bool {
        let mut strict = self.flags & endpoint_flags::STRICT != 0;
        let mut i = 0;
        while i < MTLS_PORTS {
            if port != 0 && self.mtls_ports[i] == port {
                strict = !strict;
                break;
            }
            i += 1;
        }
        strict
    }

    /// The pod's own address of a family (IPv4 mapped); `None` when it has
    /// none of that family.
    #[inline(always)]
    pub fn address(&self, v6: bool) -> Option<[u8; 16]> {
        if v6 {
            (self.ip6 != [0; 16]).then_some(self.ip6)
        } else {
            (self.ip4 != [0; 4]).then(|| ipv4_mapped(self.ip4))
        }
    }

    /// Whether `addr`, of family `v6`, is the pod's own address.
    #[inline(always)]
    pub fn is_own(&self, addr: &[u8; 16], v6: bool) -> bool {
        self.address(v6).is_some_and(|own| same_addr(&own, addr))
    }
}

// === policy ===

/// LPM trie of the compiled network policies of the node's endpoints: an
/// entry allows traffic; no entry (for an endpoint with any) denies it.
pub const MAP_POLICY: &str = "policy";
pub const POLICY_MAX_ENTRIES: u32 = 262_144;

/// [`PolicyKey::direction`].
pub mod direction {
    /// To the endpoint (its ingress policy).
    pub const INGRESS: u8 = 1;
    /// From the endpoint (its egress policy).
    pub const EGRESS: u8 = 2;

    pub const fn name(d: u8) -> &'static str {
        match d {
            INGRESS => "ingress",
            EGRESS => "egress",
            _ => "unknown",
        }
    }
}

/// Key of [`MAP_POLICY`], matched longest prefix first, field by field in
/// this order. An entry ending after `endpoint_id` (prefix 64) is the
/// not-isolated entry of an endpoint and direction; after `identity` (96),
/// every protocol and port of that peer; after `protocol` (112), every port;
/// and a port range is a few prefixes of `port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// [`direction`].
    pub direction: u8,
    pub _pad: [u8; 3],
    pub endpoint_id: u32,
    /// The peer's identity; [`identity::ANY`] for rules that allow every peer.
    pub identity: u32,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
    pub _pad2: u8,
    /// The endpoint's port (ingress) or the peer's port (egress), big-endian
    /// bytes so that a range is a prefix.
    pub port: [u8; 2],
}

impl PolicyKey {
    /// Bits of the prefix up to and including each field.
    pub const PREFIX_ENDPOINT: u32 = 64;
    pub const PREFIX_IDENTITY: u32 = 96;
    pub const PREFIX_PROTOCOL: u32 = 112;
    pub const PREFIX_FULL: u32 = 128;

    #[inline(always)]
    pub const fn new(
        direction: u8,
        endpoint_id: u32,
        identity: u32,
        protocol: u8,
        port: u16,
    ) -> Self {
        Self {
            direction,
            _pad: [0; 3],
            endpoint_id,
            identity,
            protocol,
            _pad2: 0,
            port: port.to_be_bytes(),
        }
    }
}

/// Value of [`MAP_POLICY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntry {
    /// The rule that allows it: an index into the agent's rule table
    /// (`trellis policy` prints them); [`RULE_NOT_ISOLATED`] for the
    /// not-isolated entry.
    pub rule_id: u32,
    /// Reserved.
    pub flags: u32,
}

/// [`PolicyEntry::rule_id`] of an endpoint no policy isolates.
pub const RULE_NOT_ISOLATED: u32 = 0;

/// A policy decision: allowed or not, why ([`reason`]), by which rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: u32,
    pub rule_id: u32,
}

impl Decision {
    #[inline(always)]
    pub const fn allow(reason: u32) -> Self {
        Self {
            allowed: true,
            reason,
            rule_id: 0,
        }
    }

    #[inline(always)]
    pub const fn deny(reason: u32) -> Self {
        Self {
            allowed: false,
            reason,
            rule_id: 0,
        }
    }

    #[inline(always)]
    pub const fn verdict(&self) -> u32 {
        if self.allowed {
            verdict::PASS
        } else {
            verdict::DENY
        }
    }
}

/// The policy verdict for a peer with `identity` (and `cidr_identity`, the
/// identity of the most specific policy CIDR holding its address; 0 for
/// none), given `lookup`: the endpoint's entry for a peer identity (the
/// policy map's longest match for the direction, protocol and port). The
/// one rule the kernel programs and the agent both apply: the node itself
/// always passes (Kubernetes); then the peer's own identity, its CIDR's,
/// and any peer.
#[inline(always)]
pub fn judge(
    identity: u32,
    cidr_identity: u32,
    mut lookup: impl FnMut(u32) -> Option<u32>,
) -> Decision {
    if identity == identity::HOST {
        return Decision::allow(reason::HOST);
    }
    let mut rule = lookup(identity);
    if rule.is_none() && cidr_identity != 0 && cidr_identity != identity {
        rule = lookup(cidr_identity);
    }
    if rule.is_none() && identity != identity::ANY {
        rule = lookup(identity::ANY);
    }
    match rule {
        Some(RULE_NOT_ISOLATED) => Decision::allow(reason::NOT_ISOLATED),
        Some(rule_id) => Decision {
            allowed: true,
            reason: reason::POLICY_ALLOWED,
            rule_id,
        },
        None => Decision::deny(reason::POLICY_DENIED),
    }
}

// === connection tracking ===

/// LRU hash of the flows the pod programs allowed, so replies pass and
/// established flows skip the policy lookup.
pub const MAP_CONNTRACK: &str = "conntrack";
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;

/// Key of [`MAP_CONNTRACK`]: a flow as the endpoint's interface saw its
/// first packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host order; ICMP echo: the identifier as `sport`, 0 as `dport`.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// [`direction`] of the flow for the endpoint.
    pub direction: u8,
    pub _pad: u16,
    /// Host-side ifindex of the endpoint's interface.
    pub ifindex: u32,
}

/// Value of [`MAP_CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` at the first packet.
    pub created_ns: u64,
    /// [`DatapathConfig::policy_revision`] the flow was last judged at: a
    /// newer one judges it again (a policy change reaches running flows).
    pub revision: u32,
    /// The rule that allowed it.
    pub rule_id: u32,
}

// === flow events ===

/// Ring buffer of [`FlowEvent`]s: new flows and denials. The agent drains
/// it at every wake-up, so it only has to hold a burst (3,000-odd events);
/// its pages are resident in the agent twice over (the ring is mapped
/// twice), so it is no bigger.
pub const MAP_FLOWS: &str = "flows";
pub const FLOWS_BYTES: u32 = 1 << 18;

/// One flow event, as the kernel writes it to [`MAP_FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns`.
    pub time_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// [`direction`] for the endpoint.
    pub direction: u8,
    /// [`hook`] that decided, as u16.
    pub hook: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub endpoint_id: u32,
    /// [`verdict`].
    pub verdict: u32,
    /// [`reason`].
    pub reason: u32,
    /// The rule that allowed it (see [`PolicyEntry::rule_id`]); 0 otherwise.
    pub rule_id: u32,
}

// === original destinations ===

/// Socket cookie → original destination of a captured connect (LRU).
pub const MAP_ORIG_BY_COOKIE: &str = "orig_by_cookie";
/// The client's address:port → original destination, indexed by sock_ops on
/// established, so the agent finds it from the accepted socket's peer (LRU).
pub const MAP_ORIG_BY_TUPLE: &str = "orig_by_tuple";
pub const ORIG_MAX_ENTRIES: u32 = 65536;

/// Value of [`MAP_ORIG_BY_COOKIE`] and [`MAP_ORIG_BY_TUPLE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// What the application asked for.
    pub dst: IpPort,
    /// The connecting endpoint.
    pub endpoint_id: u32,
    /// The service, when `dst` is a service VIP; 0 for a pod address.
    pub service_id: u32,
}

// === sockets (sk_msg) ===

/// SOCKHASH of the sockets sk_msg acts on, keyed by [`SockKey`]: pod sockets
/// of captured connections (added by sock_ops) and the agent's sockets facing
/// them (added by the agent).
pub const MAP_SOCKETS: &str = "sockets";
/// [`SockKey`] → [`SockState`] for every socket in [`MAP_SOCKETS`] (LRU).
pub const MAP_SOCK_STATE: &str = "sock_state";
pub const SOCKETS_MAX_ENTRIES: u32 = 65536;

/// A TCP connection as one of its two sockets sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    pub local: IpPort,
    pub remote: IpPort,
}

impl SockKey {
    /// The same connection seen from the other socket.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
        }
    }
}

/// [`SockState::mode`] of a pod socket: where its data goes.
pub mod sock_mode {
    /// Through TCP to the agent, until the agent has read every byte sent so far.
    pub const CATCHING_UP: u32 = 0;
    /// Straight into the agent's socket (sk_msg, ingress).
    pub const PEER: u32 = 1;
    /// Straight into the socket the agent spliced it to, around the agent.
    pub const SPLICED: u32 = 2;

    pub const fn name(mode: u32) -> &'static str {
        match mode {
            CATCHING_UP => "catching-up",
            PEER => "peer",
            SPLICED => "spliced",
            _ => "unknown",
        }
    }
}

/// Bits of [`SockState::flags`].
pub mod sock_flags {
    /// The agent's socket (written by the agent only; pod sockets' entries
    /// are written by the kernel only).
    pub const AGENT: u32 = 1 << 0;
    /// On an agent socket: send what the facing pod socket writes to
    /// [`super::SockState::target`] instead, once the agent has caught up.
    pub const SPLICE: u32 = 1 << 1;
    /// On a pod socket: it fell more than [`super::SK_MSG_BACKLOG_MAX`] bytes
    /// behind in reading what was redirected into it; the agent's socket
    /// facing it sends through TCP until it has caught up (kernel-written).
    pub const BACKLOGGED: u32 = 1 << 2;
}

/// The most unread bytes sk_msg queues on a socket. A redirect skips the
/// TCP windows that hold a fast sender back (the kernel charges the queued
/// bytes to the node, not to a buffer limit), so without a bound a reader
/// that stalls (a slow app, a throttled agent) lets its writer fill the
/// node's TCP memory until every socket's send fails with ENOMEM. Past it,
/// the writer's bytes take TCP until it is safe to return: into the agent's
/// socket until the agent has forwarded every byte (as at the start), into a
/// pod socket until it has read every byte and none of the agent's is still
/// on the way (a spliced pod goes through the agent meanwhile). About four
/// times what a bulk transfer queues at full speed.
pub const SK_MSG_BACKLOG_MAX: u32 = 8 << 20;

/// How often, in bytes, the agent publishes its `forwarded` count once the
/// pod socket facing it is on its final path: sk_msg reads the unread bytes
/// of an agent socket as the pod socket's `sent` minus that count.
pub const SK_MSG_FORWARDED_EVERY: u64 = 1 << 20;

/// Value of [`MAP_SOCK_STATE`].
///
/// Order is kept by counting: a pod socket's data moves from the TCP path to
/// a redirect (or from the agent to a splice) only when the agent's socket
/// facing it reports `forwarded` equal to the pod socket's `sent`, that is
/// when no earlier byte is still queued anywhere on the old path. `sent` is
/// therefore built from counts that cannot miss a byte: what sk_msg
/// redirected, plus how far the socket's TCP write sequence has moved (the
/// kernel skips the program for some sends after one through TCP fails with
/// EAGAIN, so counting per program run would fall short).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// Pod socket: bytes it has sent, by any path (the connection's byte count).
    pub sent: u64,
    /// Agent socket: bytes the agent has read from it and written onwards.
    pub forwarded: u64,
    /// Agent socket with [`sock_flags::SPLICE`]: where the facing pod
    /// socket's data goes. Pod socket in [`sock_mode::SPLICED`]: its target.
    pub target: SockKey,
    /// Pod socket: one of [`sock_mode`].
    pub mode: u32,
    /// [`sock_flags`] bits.
    pub flags: u32,
    /// Pod socket: the kernel's address of the socket, taken by sock_ops,
    /// through which sk_msg reads its TCP write sequence and how much of it
    /// is unread (a redirect program cannot look a socket up by key).
    /// Kernel-written; the agent never shows it.
    pub sk: u64,
    /// Pod socket: bytes sk_msg redirected.
    pub redirected: u64,
    /// Pod socket: of those, the bytes spliced around the agent (the rest
    /// went into the agent's socket, and the agent counts what it relays).
    pub spliced: u64,
    /// Pod socket: bytes written through TCP, up to `tcp_seq`.
    pub tcp_sent: u64,
    /// Pod socket: its TCP write sequence when last looked at.
    pub tcp_seq: u32,
    pub _pad: u32,
}

/// Where the kernel programs find two fields of the running kernel's
/// structures, which Rust programs cannot relocate themselves: set by the
/// agent at load from the kernel's BTF ([`OFFSET_UNKNOWN`] when it could not,
/// and then sk_msg redirects nothing).
pub const GLOBAL_SOCK_RMEM_ALLOC: &str = "SOCK_RMEM_ALLOC_OFFSET";
pub const GLOBAL_TCP_WRITE_SEQ: &str = "TCP_WRITE_SEQ_OFFSET";
pub const GLOBAL_TCP_SND_UNA: &str = "TCP_SND_UNA_OFFSET";
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

// === layout checks: a change here is a change of LAYOUT_VERSION ===

const _: () = {
    assert!(size_of::<CounterKey>() == 16);
    assert!(offset_of!(CounterKey, endpoint_id) == 12);
    assert!(size_of::<CounterValue>() == 16);
    assert!(size_of::<EndpointKey>() == 8);
    assert!(size_of::<EndpointInfo>() == 16);
    assert!(offset_of!(EndpointInfo, ifindex) == 12);
    assert!(size_of::<IpPort>() == 20);
    assert!(offset_of!(IpPort, port) == 16);
    assert!(size_of::<DatapathConfig>() == 32);
    assert!(offset_of!(DatapathConfig, capture_ip6) == 12);
    assert!(size_of::<SockKey>() == 40);
    assert!(size_of::<SockState>() == 104);
    assert!(offset_of!(SockState, sk) == 64);
    assert!(offset_of!(SockState, tcp_seq) == 96);
    assert!(offset_of!(SockState, target) == 16);
    assert!(offset_of!(SockState, mode) == 56);
    assert!(size_of::<ServiceInfo>() == 8);
    assert!(size_of::<IpInfo>() == 12);
    assert!(size_of::<PodIface>() == 48);
    assert!(offset_of!(PodIface, mtls_ports) == 32);
    assert!(size_of::<PolicyKey>() == 16);
    assert!(offset_of!(PolicyKey, endpoint_id) * 8 + 32 == PolicyKey::PREFIX_ENDPOINT as usize);
    assert!(offset_of!(PolicyKey, identity) * 8 + 32 == PolicyKey::PREFIX_IDENTITY as usize);
    assert!(offset_of!(PolicyKey, port) * 8 == PolicyKey::PREFIX_PROTOCOL as usize);
    assert!(size_of::<PolicyEntry>() == 8);
    assert!(size_of::<CtKey>() == 44);
    assert!(offset_of!(CtKey, ifindex) == 40);
    assert!(size_of::<CtEntry>() == 16);
    assert!(size_of::<FlowEvent>() == 72);
    assert!(offset_of!(FlowEvent, src_identity) == 48);
    assert!(size_of::<OrigDst>() == 28);
    assert!(offset_of!(OrigDst, endpoint_id) == 20);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: each type is #[repr(C)], Copy, made only of integers, with no
    // implicit padding (checked above), so every bit pattern is valid.
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for IpPort {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for IpInfo {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for PodIface {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyEntry {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FlowEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_127_slash_8_and_colon_colon_1() {
        let v6 = |last: u8| {
            let mut a = [0; 16];
            a[15] = last;
            IpPort {
                addr: a,
                port: 80,
                _pad: 0,
            }
        };
        assert!(IpPort::v4([127, 0, 0, 1], 80).is_loopback());
        assert!(IpPort::v4([127, 9, 8, 7], 80).is_loopback());
        assert!(!IpPort::v4([10, 0, 0, 1], 80).is_loopback());
        assert!(!IpPort::v4([0, 0, 0, 1], 80).is_loopback());
        assert!(v6(1).is_loopback());
        assert!(!v6(2).is_loopback());
        assert!(!v6(0).is_loopback());
    }
}
