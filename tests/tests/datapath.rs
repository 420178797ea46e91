//! The kernel programs, loaded through the agent's loader, on this kernel.

use std::time::Duration;

use trellis_agent::bpf::{self, Attachment, Datapath, maps::Counter};
use trellis_tests::{Lab, Pod, process::ChildGuard, sys::cgroup_program_names};

/// The counter a non-meshed pod's connect() adds to.
fn connect4_not_meshed(counters: &[Counter]) -> u64 {
    counters
        .iter()
        .filter(|c| c.hook == "connect4" && c.verdict == "pass" && c.reason == "not-meshed")
        .map(|c| c.events)
        .sum()
}

/// A real HTTP server in `pod` on 8080, answered once reachable from its node.
fn http_server(lab_node: &trellis_tests::Node, pod: &Pod) -> ChildGuard {
    let mut cmd = pod.exec().command("python3").expect("command");
    cmd.args(["-m", "http.server", "8080", "--bind", "0.0.0.0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let server = ChildGuard::spawn(&mut cmd).expect("spawn server");
    let url = format!("http://{}:8080/", pod.ip);
    for _ in 0..100 {
        let out = lab_node.exec().output(
            "curl",
            &["-fsS", "-m", "1", "-o", "/dev/null", &url],
            Duration::from_secs(3),
        );
        if out.is_ok_and(|o| o.status.success()) {
            return server;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("http server in {} never answered", pod.name);
}

fn curl_from(pod: &Pod, url: &str) -> std::process::Output {
    pod.exec()
        .output(
            "curl",
            &[
                "-sS",
                "-m",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url,
            ],
            Duration::from_secs(10),
        )
        .expect("curl")
}

#[test]
fn connect4_counts_a_pod_connect_in_a_pinned_btf_map() {
    let mut lab = Lab::new("connect4_counts_a_pod_connect_in_a_pinned_btf_map").expect("lab");
    let node = lab.add_node("a").expect("node");
    let client = lab.add_pod(&node, "a1").expect("pod");
    let server_pod = lab.add_pod(&node, "a2").expect("pod");
    let _server = http_server(&node, &server_pod);

    let datapath = Datapath::install(&node.cgroup_root, &node.bpffs).expect("install");
    assert!(
        datapath
            .programs()
            .iter()
            .all(|p| p.attachment == Attachment::Attached)
    );
    assert_eq!(
        connect4_not_meshed(&bpf::maps::counters(&node.bpffs).expect("read")),
        0
    );

    // A real client inside the pod (netns + cgroup under the root) connects once.
    let out = curl_from(&client, &format!("http://{}:8080/", server_pod.ip));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    let counted = connect4_not_meshed(&bpf::maps::counters(&node.bpffs).expect("read"));
    assert_eq!(counted, 1, "one connect() from the pod, one event");

    // The same connect from the node, outside the cgroup root, is not seen.
    let out = node
        .exec()
        .output(
            "curl",
            &[
                "-sS",
                "-m",
                "3",
                "-o",
                "/dev/null",
                &format!("http://{}:8080/", server_pod.ip),
            ],
            Duration::from_secs(10),
        )
        .expect("curl");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        connect4_not_meshed(&bpf::maps::counters(&node.bpffs).expect("read")),
        1
    );

    // bpftool decodes the pinned map with the BTF field names.
    let map = node.bpffs.join("maps").join(trellis_common::MAP_COUNTERS);
    let dump = trellis_tests::sys::bpftool_map_dump(&map).expect("bpftool map dump");
    let entry = dump
        .as_array()
        .and_then(|entries| {
            entries
                .iter()
                .find(|e| e["formatted"]["key"]["hook"] == trellis_common::hook::CONNECT4)
        })
        .unwrap_or_else(|| panic!("no connect4 entry with named fields in {dump}"));
    let key = &entry["formatted"]["key"];
    for field in ["hook", "verdict", "reason", "endpoint_id"] {
        assert!(key.get(field).is_some(), "key lacks {field}: {key}");
    }
    let events: u64 = entry["formatted"]["values"]
        .as_array()
        .expect("per-CPU values")
        .iter()
        .map(|v| v["value"]["events"].as_u64().expect("events field"))
        .sum();
    assert_eq!(events, 1);
}

#[test]
fn pinned_links_keep_enforcing_without_an_agent_and_are_adopted() {
    let mut lab =
        Lab::new("pinned_links_keep_enforcing_without_an_agent_and_are_adopted").expect("lab");
    let node = lab.add_node("a").expect("node");
    let client = lab.add_pod(&node, "a1").expect("pod");
    let server_pod = lab.add_pod(&node, "a2").expect("pod");
    let _server = http_server(&node, &server_pod);
    let url = format!("http://{}:8080/", server_pod.ip);

    let first = Datapath::install(&node.cgroup_root, &node.bpffs).expect("install");
    drop(first); // the agent is gone: only the pins hold the program

    curl_from(&client, &url);
    assert_eq!(
        connect4_not_meshed(&bpf::maps::counters(&node.bpffs).expect("read")),
        1,
        "still counted with no agent"
    );

    let second = Datapath::install(&node.cgroup_root, &node.bpffs).expect("reinstall");
    assert!(
        second
            .programs()
            .iter()
            .all(|p| p.attachment == Attachment::Adopted)
    );
    curl_from(&client, &url);
    // Same map (adopted pin), each program once (link updated, not a second attach).
    assert_eq!(
        connect4_not_meshed(&bpf::maps::counters(&node.bpffs).expect("read")),
        2
    );
    let attached = cgroup_program_names(&node.cgroup_root).expect("bpftool");
    let mut once = attached.clone();
    once.dedup();
    assert_eq!(
        (attached.len(), once.len()),
        (7, 7),
        "each cgroup program once after adoption: {attached:?}"
    );

    drop(second);
    let removed = bpf::uninstall(&node.bpffs).expect("uninstall");
    assert!(!removed.is_empty());
    assert!(
        cgroup_program_names(&node.cgroup_root)
            .expect("bpftool")
            .is_empty(),
        "uninstall detached everything"
    );
    assert!(!node.bpffs.exists(), "uninstall removed the pin folder");
    curl_from(&client, &url);
}

/// The kernel object's BTF and the shared crate agree on every map type's
/// size and field offsets: a layout drift fails here, not in production.
#[test]
fn btf_of_the_object_matches_the_shared_types() {
    use std::mem::{offset_of, size_of};

    use trellis_common::{
        CounterKey, CounterValue, CtKey, DatapathConfig, EndpointInfo, EndpointKey, IpInfo, IpPort,
        OrigDst, PodIface, PolicyKey, SockKey, SockState,
    };

    let object = std::env::temp_dir().join(format!("trellis-ebpf-{}.o", std::process::id()));
    std::fs::write(&object, bpf::OBJECT).expect("write object");
    let btf = trellis_tests::sys::bpftool_json(&[
        std::path::Path::new("btf"),
        std::path::Path::new("dump"),
        std::path::Path::new("file"),
        &object,
    ]);
    let _ = std::fs::remove_file(&object);
    let btf = btf.expect("bpftool btf dump");
    let types = btf["types"].as_array().expect("types");

    let check = |name: &str, size: usize, fields: &[(&str, usize)]| {
        let ty = types
            .iter()
            .find(|t| t["kind"] == "STRUCT" && t["name"] == name)
            .unwrap_or_else(|| panic!("no struct {name} in the object's BTF"));
        assert_eq!(ty["size"].as_u64(), Some(size as u64), "{name} size");
        let members = ty["members"].as_array().expect("members");
        assert_eq!(
            members.len(),
            fields.len(),
            "{name} field count: {members:?}"
        );
        for (field, offset) in fields {
            let m = members
                .iter()
                .find(|m| m["name"] == *field)
                .unwrap_or_else(|| panic!("{name} has no field {field} in BTF"));
            assert_eq!(
                m["bits_offset"].as_u64(),
                Some(*offset as u64 * 8),
                "{name}.{field} offset"
            );
        }
    };
    check(
        "CounterKey",
        size_of::<CounterKey>(),
        &[
            ("hook", offset_of!(CounterKey, hook)),
            ("verdict", offset_of!(CounterKey, verdict)),
            ("reason", offset_of!(CounterKey, reason)),
            ("endpoint_id", offset_of!(CounterKey, endpoint_id)),
        ],
    );
    check(
        "CounterValue",
        size_of::<CounterValue>(),
        &[
            ("events", offset_of!(CounterValue, events)),
            ("bytes", offset_of!(CounterValue, bytes)),
        ],
    );
    check(
        "EndpointKey",
        size_of::<EndpointKey>(),
        &[("netns_cookie", offset_of!(EndpointKey, netns_cookie))],
    );
    check(
        "EndpointInfo",
        size_of::<EndpointInfo>(),
        &[
            ("endpoint_id", offset_of!(EndpointInfo, endpoint_id)),
            ("identity", offset_of!(EndpointInfo, identity)),
            ("flags", offset_of!(EndpointInfo, flags)),
            ("ifindex", offset_of!(EndpointInfo, ifindex)),
        ],
    );
    check(
        "IpPort",
        size_of::<IpPort>(),
        &[
            ("addr", offset_of!(IpPort, addr)),
            ("port", offset_of!(IpPort, port)),
            ("_pad", offset_of!(IpPort, _pad)),
        ],
    );
    check(
        "DatapathConfig",
        size_of::<DatapathConfig>(),
        &[
            ("capture_ip4", offset_of!(DatapathConfig, capture_ip4)),
            ("capture_port", offset_of!(DatapathConfig, capture_port)),
            ("_pad", offset_of!(DatapathConfig, _pad)),
            ("flags", offset_of!(DatapathConfig, flags)),
            ("capture_ip6", offset_of!(DatapathConfig, capture_ip6)),
            (
                "policy_revision",
                offset_of!(DatapathConfig, policy_revision),
            ),
        ],
    );
    check(
        "IpInfo",
        size_of::<IpInfo>(),
        &[
            ("identity", offset_of!(IpInfo, identity)),
            ("flags", offset_of!(IpInfo, flags)),
            ("cidr_identity", offset_of!(IpInfo, cidr_identity)),
        ],
    );
    check(
        "PolicyKey",
        size_of::<PolicyKey>(),
        &[
            ("direction", offset_of!(PolicyKey, direction)),
            ("_pad", offset_of!(PolicyKey, _pad)),
            ("endpoint_id", offset_of!(PolicyKey, endpoint_id)),
            ("identity", offset_of!(PolicyKey, identity)),
            ("protocol", offset_of!(PolicyKey, protocol)),
            ("_pad2", offset_of!(PolicyKey, _pad2)),
            ("port", offset_of!(PolicyKey, port)),
        ],
    );
    check(
        "PodIface",
        size_of::<PodIface>(),
        &[
            ("endpoint_id", offset_of!(PodIface, endpoint_id)),
            ("identity", offset_of!(PodIface, identity)),
            ("flags", offset_of!(PodIface, flags)),
            ("ip4", offset_of!(PodIface, ip4)),
            ("ip6", offset_of!(PodIface, ip6)),
            ("mtls_ports", offset_of!(PodIface, mtls_ports)),
        ],
    );
    check(
        "CtKey",
        size_of::<CtKey>(),
        &[
            ("saddr", offset_of!(CtKey, saddr)),
            ("daddr", offset_of!(CtKey, daddr)),
            ("sport", offset_of!(CtKey, sport)),
            ("dport", offset_of!(CtKey, dport)),
            ("protocol", offset_of!(CtKey, protocol)),
            ("direction", offset_of!(CtKey, direction)),
            ("_pad", offset_of!(CtKey, _pad)),
            ("ifindex", offset_of!(CtKey, ifindex)),
        ],
    );
    check(
        "OrigDst",
        size_of::<OrigDst>(),
        &[
            ("dst", offset_of!(OrigDst, dst)),
            ("endpoint_id", offset_of!(OrigDst, endpoint_id)),
            ("service_id", offset_of!(OrigDst, service_id)),
        ],
    );
    check(
        "SockKey",
        size_of::<SockKey>(),
        &[
            ("local", offset_of!(SockKey, local)),
            ("remote", offset_of!(SockKey, remote)),
        ],
    );
    check(
        "SockState",
        size_of::<SockState>(),
        &[
            ("sent", offset_of!(SockState, sent)),
            ("forwarded", offset_of!(SockState, forwarded)),
            ("target", offset_of!(SockState, target)),
            ("mode", offset_of!(SockState, mode)),
            ("flags", offset_of!(SockState, flags)),
            ("sk", offset_of!(SockState, sk)),
            ("redirected", offset_of!(SockState, redirected)),
            ("spliced", offset_of!(SockState, spliced)),
            ("tcp_sent", offset_of!(SockState, tcp_sent)),
            ("tcp_seq", offset_of!(SockState, tcp_seq)),
            ("_pad", offset_of!(SockState, _pad)),
        ],
    );
}

/// Maps pinned by an agent of another map layout are made anew instead of
/// being misread, and the sk_msg link that hung off the old sockhash with
/// them; maps of the same layout are adopted.
#[test]
fn maps_of_another_layout_are_made_anew() {
    use aya::maps::{Array, MapData, MapInfo};
    use trellis_common::{LAYOUT_VERSION, MAP_LAYOUT, MAP_SOCK_STATE, PROG_SK_MSG};

    let mut lab = Lab::new("maps_of_another_layout_are_made_anew").expect("lab");
    let node = lab.add_node("a").expect("node");
    let layout = bpf::PinLayout::new(&node.bpffs);
    let map_id = || {
        MapInfo::from_pin(layout.map(MAP_SOCK_STATE))
            .expect("pinned")
            .id()
    };
    let sk_msg = |d: &Datapath| {
        d.programs()
            .iter()
            .find(|p| p.name == PROG_SK_MSG)
            .expect("sk_msg attached")
            .attachment
    };

    drop(Datapath::install(&node.cgroup_root, &node.bpffs).expect("install"));
    assert_eq!(layout.pinned_layout(), Some(LAYOUT_VERSION));
    let first = map_id();

    let same = Datapath::install(&node.cgroup_root, &node.bpffs).expect("same layout");
    assert_eq!(map_id(), first, "same layout: the pinned maps are adopted");
    assert_eq!(sk_msg(&same), Attachment::Adopted);
    drop(same);

    // As an agent of the previous layout would have left them.
    let mut recorded: Array<MapData, u32> = layout.open_map(MAP_LAYOUT).expect("layout map");
    recorded.set(0, LAYOUT_VERSION - 1, 0).expect("set");
    drop(recorded);
    let other = Datapath::install(&node.cgroup_root, &node.bpffs).expect("other layout");
    assert_ne!(map_id(), first, "another layout: the maps are made anew");
    assert_eq!(layout.pinned_layout(), Some(LAYOUT_VERSION));
    assert_eq!(sk_msg(&other), Attachment::Attached, "on the new sockhash");
    drop(other);
    bpf::uninstall(&node.bpffs).expect("uninstall");
}
