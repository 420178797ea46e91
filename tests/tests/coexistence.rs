//! Trellis beside another CNI's cgroup programs, as with Cilium's socket
//! load balancer, which attaches `cgroup/connect4` at the cgroup2 root. A
//! stand-in foreign program is loaded here from raw instructions (no BPF
//! toolchain of another project): it refuses `connect()` to ports 80 and
//! 9999, and it is attached with `BPF_F_ALLOW_MULTI` at the parent of the
//! node's cgroup root before the agent starts, as a CNI installed first is.
//!
//! Checked: the agent attaches beside it (its links are multi-attach) and
//! leaves it attached through restart and `--uninstall`; the foreign
//! program still refuses what it refuses for traffic Trellis does not
//! capture; and the kernel runs a cgroup's own programs before its
//! parent's, so Trellis sees a Service VIP first and rewrites it to its
//! capture port, which the foreign program (refusing port 80) lets through.
//! That order is why Cilium's socket LB must not act in pod namespaces
//! under Trellis either way (docs/operations.md, "Beside another CNI").

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use trellis_tests::{Lab, Pod, mesh, mesh::Cluster, py, sys};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 2;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: bpf(2) with a zero-padded attribute buffer of the size given.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put(attr: &mut [u8; 128], offset: usize, bytes: &[u8]) {
    attr[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// `cgroup/connect4`: refuses ports 80 and 9999, allows the rest.
fn load_foreign_program() -> OwnedFd {
    // struct bpf_insn: code, dst | src << 4, off (i16), imm (i32).
    let insn = |code: u8, regs: u8, off: i16, imm: i32| {
        let mut b = [0u8; 8];
        b[0] = code;
        b[1] = regs;
        b[2..4].copy_from_slice(&off.to_le_bytes());
        b[4..8].copy_from_slice(&imm.to_le_bytes());
        b
    };
    // user_port is at offset 24 of bpf_sock_addr, in network byte order.
    let port = |p: u16| i32::from(u16::from_le_bytes(p.to_be_bytes()));
    let program: Vec<u8> = [
        insn(0x61, 0x12, 24, 0),         // r2 = ctx->user_port
        insn(0x15, 0x02, 3, port(80)),   // if r2 == 80 goto deny
        insn(0x15, 0x02, 2, port(9999)), // if r2 == 9999 goto deny
        insn(0xb7, 0x00, 0, 1),          // r0 = 1 (allow)
        insn(0x95, 0x00, 0, 0),          // exit
        insn(0xb7, 0x00, 0, 0),          // deny: r0 = 0
        insn(0x95, 0x00, 0, 0),          // exit
    ]
    .concat();
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_le_bytes());
    put(&mut attr, 4, &((program.len() / 8) as u32).to_le_bytes());
    put(&mut attr, 8, &(program.as_ptr() as u64).to_le_bytes());
    put(&mut attr, 16, &(license.as_ptr() as u64).to_le_bytes());
    put(&mut attr, 48, b"other_cni\0");
    put(&mut attr, 68, &BPF_CGROUP_INET4_CONNECT.to_le_bytes());
    let fd = bpf(BPF_PROG_LOAD, &mut attr).expect("loading the foreign program");
    // SAFETY: BPF_PROG_LOAD returned a new descriptor.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn attach(cmd: libc::c_long, cgroup: &Path, program: &OwnedFd) -> std::io::Result<()> {
    let dir = std::fs::File::open(cgroup)?;
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &(dir.as_raw_fd() as u32).to_le_bytes());
    put(&mut attr, 4, &(program.as_raw_fd() as u32).to_le_bytes());
    put(&mut attr, 8, &BPF_CGROUP_INET4_CONNECT.to_le_bytes());
    // Detaching takes no flags (EINVAL for cgroup programs on 6.x).
    if cmd == BPF_PROG_ATTACH {
        put(&mut attr, 12, &BPF_F_ALLOW_MULTI.to_le_bytes());
    }
    bpf(cmd, &mut attr).map(drop)
}

fn probe(client: &Pod, ip: &str, port: u16) -> String {
    client
        .exec()
        .python_output(
            py::NETPOL_PROBE,
            &["2", &format!("p,{ip},{port},TCP,web")],
            Duration::from_secs(10),
        )
        .expect("probe")
}

#[test]
fn trellis_runs_beside_another_cnis_cgroup_programs() {
    let mut lab = Lab::new("coexistence").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&a, "a2").expect("pod");
    let _web = server
        .serve(py::NAME_SERVER, &["web", "8080"], 8080)
        .expect("web");
    let parent = a.cgroup_root.parent().expect("the lab's cgroup").to_owned();
    let foreign = load_foreign_program();
    attach(BPF_PROG_ATTACH, &parent, &foreign).expect("attaching the foreign program");
    let foreign_attached = || {
        sys::cgroup_program_names(&parent)
            .expect("bpftool")
            .iter()
            .any(|n| n == "other_cni")
    };
    assert!(foreign_attached());

    let docs = [
        mesh::node(&a),
        mesh::namespace("shop", true),
        mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
        mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
        mesh::service("shop", "web", "10.96.0.80", 80, "8080", &[("app", "web")]),
    ];
    let mut cluster = Cluster::start(lab.name(), &[&a], &docs).expect("agent");
    assert!(foreign_attached(), "the agent attached beside it");
    assert_eq!(
        sys::cgroup_program_names(&a.cgroup_root)
            .expect("bpftool")
            .len(),
        7,
        "the agent's seven cgroup programs on the node's cgroup root"
    );

    // Trellis first: the VIP on port 80 becomes the capture port before the
    // foreign program (which refuses port 80) sees the connect.
    let body = client
        .exec()
        .output(
            "curl",
            &["-s", "-m", "3", "http://10.96.0.80/"],
            Duration::from_secs(10),
        )
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&body.stdout), "web");
    // The foreign program still decides what Trellis does not capture: the
    // node's address (not in the mesh) on 9999 is refused at connect(),
    // 9998 is only refused by the node (nothing listens).
    let node_ip = a.ip.to_string();
    assert!(
        probe(&client, &node_ip, 9999).contains("p EPERM"),
        "the foreign verdict applies"
    );
    assert!(
        probe(&client, &node_ip, 9998).contains("p FAIL"),
        "a plain refused connect"
    );

    // A restart adopts the agent's own links and leaves the foreign program.
    cluster.restart(0, &a, &[]).expect("restart");
    assert!(foreign_attached());
    cluster.agents[0].terminate().expect("stop");
    trellis_tests::uninstall(&a).expect("uninstall");
    assert!(
        sys::cgroup_program_names(&a.cgroup_root)
            .expect("bpftool")
            .is_empty(),
        "the agent's programs are gone"
    );
    assert!(foreign_attached(), "the foreign program stays attached");
    assert!(probe(&client, &node_ip, 9999).contains("p EPERM"));
    attach(BPF_PROG_DETACH, &parent, &foreign).expect("detaching the foreign program");
}
