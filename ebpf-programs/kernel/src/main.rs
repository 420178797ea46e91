//! Trellis' kernel programs, one module per hook. Built for `bpfel-unknown-none`
//! by `agent/build.rs`; the agent embeds the object and loads it with aya.
//!
//! Every entry point is thin: it calls a `try_*` function and turns its
//! `Result` into the hook's return code.
#![no_std]
#![no_main]

/// Reads a context field with one load from the context pointer itself: the
/// verifier refuses loads through a pointer derived from it, which the
/// compiler would otherwise make when it reuses an address.
macro_rules! ctx_field {
    ($ctx:expr, $field:ident) => {
        // SAFETY: the kernel hands us a valid context.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx).$field)) }
    };
    ($ctx:expr, $field:ident[$i:literal]) => {
        // SAFETY: as above, one 4-byte word of an array field.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx).$field[$i])) }
    };
}

mod connect;
mod conntrack;
mod counters;
mod hbone;
mod maps;
mod packet;
mod pod;
mod policy;
mod sk_msg;
mod sock;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it exists only to
    // satisfy no_std.
    loop {}
}

/// GPL-compatible, so the kernel lets us call its GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
