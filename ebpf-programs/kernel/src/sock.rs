//! Two fields of a pod's kernel socket, read through the address sock_ops
//! took ([`trellis_common::SockState::sk`]): its unread bytes and its TCP
//! write sequence. Rust programs carry no CO-RE relocations, so where the
//! fields lie comes from the agent, which reads the kernel's BTF and sets
//! these globals at load.

use aya_ebpf::{
    Global,
    bindings::bpf_sock,
    cty::c_void,
    helpers::generated::{bpf_probe_read_kernel, bpf_skc_to_tcp_sock},
};
use trellis_common::OFFSET_UNKNOWN;

/// `struct sock`'s `sk_rmem_alloc` (named by `GLOBAL_SOCK_RMEM_ALLOC`).
#[unsafe(no_mangle)]
static SOCK_RMEM_ALLOC_OFFSET: Global<u32> = Global::new(OFFSET_UNKNOWN);

/// `struct tcp_sock`'s `write_seq` (named by `GLOBAL_TCP_WRITE_SEQ`).
#[unsafe(no_mangle)]
static TCP_WRITE_SEQ_OFFSET: Global<u32> = Global::new(OFFSET_UNKNOWN);

/// `struct tcp_sock`'s `snd_una` (named by `GLOBAL_TCP_SND_UNA`).
#[unsafe(no_mangle)]
static TCP_SND_UNA_OFFSET: Global<u32> = Global::new(OFFSET_UNKNOWN);

/// Whether the agent told us where the fields are; without them nothing is
/// redirected (a redirect could neither be bounded nor be counted).
#[inline(always)]
pub fn known() -> bool {
    SOCK_RMEM_ALLOC_OFFSET.load() != OFFSET_UNKNOWN && TCP_WRITE_SEQ_OFFSET.load() != OFFSET_UNKNOWN
}

#[inline(always)]
fn read_u32(sk: u64, offset: u32) -> Option<u32> {
    if sk == 0 || offset == OFFSET_UNKNOWN {
        return None;
    }
    let mut value: u32 = 0;
    // SAFETY: the helper copies 4 bytes or fails; it never faults. A socket
    // freed under a stale entry reads as whatever is there now; the callers
    // only use it where a wrong answer costs speed, not order.
    let ret = unsafe {
        bpf_probe_read_kernel(
            core::ptr::from_mut(&mut value).cast(),
            4,
            (sk + u64::from(offset)) as *const c_void,
        )
    };
    (ret == 0).then_some(value)
}

/// What [`unread`] returns when it cannot tell.
pub const UNREAD_UNKNOWN: u32 = u32::MAX;

/// Bytes queued on the socket that its reader has not taken: redirected
/// bytes are charged to `sk_rmem_alloc` as TCP's are. A plain number, not an
/// `Option`: the compiler packs one into a register the verifier then finds
/// shifted while it still holds a pointer on the path that has no value.
#[inline(always)]
pub fn unread(sk: u64) -> u32 {
    read_u32(sk, SOCK_RMEM_ALLOC_OFFSET.load()).unwrap_or(UNREAD_UNKNOWN)
}

/// The sequence number after the last byte written to the socket's TCP
/// stream; it moves by exactly the bytes sent through TCP.
#[inline(always)]
pub fn write_seq(sk: u64) -> Option<u32> {
    read_u32(sk, TCP_WRITE_SEQ_OFFSET.load())
}

/// Whether every byte the program's own socket (`sk`, an sk_msg context's)
/// wrote through TCP has been acknowledged, that is, sits in its peer's
/// receive queue: none is still on the way.
#[inline(always)]
pub fn all_acked(sk: *mut bpf_sock) -> bool {
    let (write_seq_at, snd_una_at) = (TCP_WRITE_SEQ_OFFSET.load(), TCP_SND_UNA_OFFSET.load());
    if write_seq_at == OFFSET_UNKNOWN || snd_una_at == OFFSET_UNKNOWN || sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the context's socket; the helper returns null unless
    // it is TCP.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    if tp.is_null() {
        return false;
    }
    let base = tp.cast::<u8>();
    // SAFETY: a BTF pointer; the offsets are load-time constants the
    // verifier sees and checks against the kernel's tcp_sock.
    let (write_seq, snd_una) = unsafe {
        (
            core::ptr::read_volatile(base.add(write_seq_at as usize).cast::<u32>()),
            core::ptr::read_volatile(base.add(snd_una_at as usize).cast::<u32>()),
        )
    };
    write_seq == snd_una
}
