//! TCP header fields of a packet at TC, as a socket-lookup tuple. Shared by
//! the programs on the uplink (HBONE steering) and on the pods' interfaces.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::bpf_skc_lookup_tcp,
    programs::TcContext,
};
use trellis_common::ipv4_mapped;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// `bpf_sock_tuple`'s IPv4 half.
#[repr(C)]
pub struct Tuple4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
}

/// `bpf_sock_tuple`'s IPv6 half.
#[repr(C)]
pub struct Tuple6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
}

/// A TCP segment's addresses and ports. The lookup tuple is one
/// zeroed `Tuple6`-sized buffer holding a `Tuple4` at its start for IPv4 (as
/// `bpf_sock_tuple`'s union does): one plain struct, fully initialised, so
/// the compiler never copies half-written enum variants the verifier would
/// refuse to read.
pub struct Tcp {
    tuple: Tuple6,
    v6: bool,
    /// Destination address, IPv4 in its mapped form (as the maps hold it).
    pub daddr: [u8; 16],
    /// Destination port, host order.
    pub dport: u16,
}

impl Tcp {
    /// The socket of this node's network namespace the segment belongs to
    /// (the tuple read from the packet's side: the socket's local address is
    /// the destination), established or listening; null when none. The caller
    /// releases a non-null result with `bpf_sk_release`.
    #[inline(always)]
    pub fn lookup(&mut self, ctx: &TcContext) -> *mut bpf_sock {
        let size = if self.v6 {
            size_of::<Tuple6>()
        } else {
            size_of::<Tuple4>()
        };
        let tuple = (&raw mut self.tuple).cast::<bpf_sock_tuple>();
        // SAFETY: the tuple lives on our stack and is at least `size` long.
        unsafe {
            bpf_skc_lookup_tcp(
                ctx.skb.skb.cast(),
                tuple,
                size as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        }
        .cast()
    }
}

/// Reads the TCP segment of an Ethernet frame; `None` for anything else.
/// IPv6 extension headers are not walked: HBONE and pod TCP carry none.
#[inline(always)]
pub fn tcp(ctx: &TcContext) -> Result<Option<Tcp>, i64> {
    let mut tcp = Tcp {
        tuple: Tuple6 {
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
        },
        v6: false,
        daddr: [0; 16],
        dport: 0,
    };
    match u16::from_be(ctx.load::<u16>(12)?) {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN)?;
            if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP {
                return Ok(None);
            }
            let l4 = ETH_HLEN + usize::from(vihl & 0x0f) * 4;
            let t4 = Tuple4 {
                saddr: ctx.load(ETH_HLEN + 12)?,
                daddr: ctx.load(ETH_HLEN + 16)?,
                sport: ctx.load(l4)?,
                dport: ctx.load(l4 + 2)?,
            };
            tcp.daddr = ipv4_mapped(t4.daddr);
            tcp.dport = u16::from_be(t4.dport);
            // SAFETY: a Tuple4 fits at the start of a Tuple6, both repr(C).
            unsafe { (&raw mut tcp.tuple).cast::<Tuple4>().write(t4) };
        }
        ETH_P_IPV6 => {
            if ctx.load::<u8>(ETH_HLEN + 6)? != IPPROTO_TCP {
                return Ok(None);
            }
            let l4 = ETH_HLEN + 40;
            tcp.tuple = Tuple6 {
                saddr: ctx.load(ETH_HLEN + 8)?,
                daddr: ctx.load(ETH_HLEN + 24)?,
                sport: ctx.load(l4)?,
                dport: ctx.load(l4 + 2)?,
            };
            tcp.v6 = true;
            tcp.daddr = tcp.tuple.daddr;
            tcp.dport = u16::from_be(tcp.tuple.dport);
        }
        _ => return Ok(None),
    }
    Ok(Some(tcp))
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;

/// Any IP packet's addresses, protocol and ports, as the policy programs
/// judge it. ICMP echo carries its identifier as both ports, so a request
/// and its reply are one flow.
pub struct Flow {
    /// IPv4 in its mapped form, as the maps hold it.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host order; 0 for protocols without ports.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// TCP flags; 0 for other protocols.
    pub tcp_flags: u8,
    /// IPv6 neighbour discovery or an ICMP error: needed for the link and
    /// the path to work, and unable to open a connection.
    pub control: bool,
    pub v6: bool,
}

impl Flow {
    /// A new TCP connection's first segment: SYN without ACK.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.protocol == IPPROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Reads an Ethernet frame's IP header and, for TCP, UDP, SCTP and ICMP,
/// its ports; `None` for anything that is not IP (ARP passes untouched).
/// Up to [`MAX_IPV6_EXTENSIONS`] IPv6 extension headers are walked; past
/// them, or in a non-first fragment, the protocol is judged without ports.
const MAX_IPV6_EXTENSIONS: usize = 4;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTIONS: u8 = 60;

#[inline(always)]
pub fn flow(ctx: &TcContext) -> Result<Option<Flow>, i64> {
    let mut flow = Flow {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        protocol: 0,
        tcp_flags: 0,
        control: false,
        v6: false,
    };
    let l4 = match u16::from_be(ctx.load::<u16>(12)?) {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN)?;
            flow.protocol = ctx.load(ETH_HLEN + 9)?;
            flow.saddr = ipv4_mapped(ctx.load(ETH_HLEN + 12)?);
            flow.daddr = ipv4_mapped(ctx.load(ETH_HLEN + 16)?);
            // Fragment offset (13 bits) non-zero: no L4 header here.
            if u16::from_be(ctx.load::<u16>(ETH_HLEN + 6)?) & 0x1fff != 0 {
                return Ok(Some(flow));
            }
            ETH_HLEN + usize::from(vihl & 0x0f) * 4
        }
        ETH_P_IPV6 => {
            flow.v6 = true;
            flow.protocol = ctx.load(ETH_HLEN + 6)?;
            flow.saddr = ctx.load(ETH_HLEN + 8)?;
            flow.daddr = ctx.load(ETH_HLEN + 24)?;
            let mut l4 = ETH_HLEN + 40;
            // Walk a few extension headers (MLD reports come after a
            // hop-by-hop header) to the upper-layer protocol.
            for _ in 0..MAX_IPV6_EXTENSIONS {
                match flow.protocol {
                    IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                        let len: u8 = ctx.load(l4 + 1)?;
                        flow.protocol = ctx.load(l4)?;
                        l4 += (usize::from(len) + 1) * 8;
                    }
                    IPV6_FRAGMENT => {
                        flow.protocol = ctx.load(l4)?;
                        // Not the first fragment: no L4 header here.
                        if u16::from_be(ctx.load::<u16>(l4 + 2)?) & 0xfff8 != 0 {
                            return Ok(Some(flow));
                        }
                        l4 += 8;
                    }
                    _ => break,
                }
            }
            l4
        }
        _ => return Ok(None),
    };
    match flow.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            flow.sport = u16::from_be(ctx.load(l4)?);
            flow.dport = u16::from_be(ctx.load(l4 + 2)?);
            if flow.protocol == IPPROTO_TCP {
                flow.tcp_flags = ctx.load(l4 + 13)?;
            }
        }
        IPPROTO_ICMP => {
            let ty: u8 = ctx.load(l4)?;
            match ty {
                // Echo reply, echo request: the identifier is the flow.
                0 | 8 => {
                    let id = u16::from_be(ctx.load(l4 + 4)?);
                    flow.sport = id;
                    flow.dport = id;
                }
                // Unreachable, time exceeded, parameter problem.
                3 | 11 | 12 => flow.control = true,
                _ => {}
            }
        }
        IPPROTO_ICMPV6 => {
            let ty: u8 = ctx.load(l4)?;
            match ty {
                // Unreachable, too big, time exceeded, parameter problem,
                // multicast listener query/report/done (v1, v2), and
                // neighbour discovery (router/neighbour solicitation and
                // advertisement, redirect).
                1..=4 | 130..=132 | 143 | 133..=137 => flow.control = true,
                // Echo request, echo reply.
                128 | 129 => {
                    let id = u16::from_be(ctx.load(l4 + 4)?);
                    flow.sport = id;
                    flow.dport = id;
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(Some(flow))
}
