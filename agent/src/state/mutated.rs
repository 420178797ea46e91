//! Objects spoiled one value at a time: each is rejected with its field and
//! reason, or taken, and whatever is taken builds into a snapshot, compiles
//! into policy and becomes ipcache content without a panic (a panic there
//! would stop the state thread, and with it every later change). The seeds
//! are `testdata/every-kind.yaml`, every kind the agent reads with most of
//! its fields. Each case puts one bad value in one place of one object:
//! every value of every object gets a share of [`bad`] values; every map
//! key and list item is removed once, and every list item doubled once.

use std::{
    collections::BTreeMap,
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
};

use serde::Deserialize as _;
use serde_json::{Value, json};

use super::{
    Snapshot,
    objects::{Object, parse_file},
};
use crate::policy::compiler::{Endpoints, Identities, compile};

const CORPUS: &str = include_str!("testdata/every-kind.yaml");

/// What a hand or a bug might write where a value belongs.
fn bad() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(65_535),
        json!(65_536),
        json!(4_294_967_296_i64),
        json!(i64::MAX),
        json!(-1.5),
        json!(""),
        json!("x".repeat(300)),
        json!("*"),
        json!("/"),
        json!("::"),
        json!("10.0.0.0/33"),
        json!("fd00::/129"),
        json!("999.1.1.1"),
        json!("-5s"),
        json!("0s"),
        json!("9999999999999h"),
        json!("2562047788015216h"),
        json!("18446744073709551615s1s"),
        json!("ünï/cödé"),
        json!("[.*"),
        json!([]),
        json!({}),
    ]
}

/// A place in a document: keys and list indices.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

fn places(value: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                at.push(Step::Key(k.clone()));
                out.push(at.clone());
                places(v, at, out);
                at.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                at.push(Step::Index(i));
                out.push(at.clone());
                places(v, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

/// The value at `path`, and what holds it.
fn parent<'a>(doc: &'a mut Value, path: &[Step]) -> (&'a mut Value, Step) {
    let (last, init) = path.split_last().expect("a place");
    let mut v = doc;
    for step in init {
        v = match step {
            Step::Key(k) => &mut v[k.as_str()],
            Step::Index(i) => &mut v[*i],
        };
    }
    (v, last.clone())
}

/// Bad values each place gets: a third of [`bad`], a different third at
/// each next place, so every value meets every field in three runs'
/// worth; `TRELLIS_SPOIL_ALL=1` gives every place all of them (about
/// 11,000 cases, a minute in a debug build).
fn share(place: usize) -> impl Fn(usize) -> bool {
    let all = std::env::var_os("TRELLIS_SPOIL_ALL").is_some_and(|v| v == "1");
    move |i| all || i % 3 == place % 3
}

/// The ways to spoil the value at `path` (the `place`th): each a
/// description and a change.
fn spoilings(doc: &Value, path: &[Step], place: usize) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut with = |what: String, change: &dyn Fn(&mut Value, &Step)| {
        let mut d = doc.clone();
        let (holder, last) = parent(&mut d, path);
        change(holder, &last);
        out.push((what, d));
    };
    let mine = share(place);
    for (_, b) in bad().into_iter().enumerate().filter(|(i, _)| mine(*i)) {
        with(format!("= {b}"), &|holder, last| match last {
            Step::Key(k) => holder[k.as_str()] = b.clone(),
            Step::Index(i) => holder[*i] = b.clone(),
        });
    }
    with("removed".into(), &|holder, last| match (holder, last) {
        (Value::Object(map), Step::Key(k)) => {
            map.remove(k);
        }
        (Value::Array(items), Step::Index(i)) => {
            items.remove(*i);
        }
        _ => {}
    });
    with("doubled".into(), &|holder, last| {
        if let (Value::Array(items), Step::Index(i)) = (holder, last) {
            let again = items[*i].clone();
            items.insert(*i, again);
        }
    });
    out
}

/// What the state thread does with the objects: build, compile, ipcache.
fn take(objects: &[Object]) {
    let snap = Snapshot::build("node-a", objects);
    let ids = Identities::build(&snap);
    let endpoints: BTreeMap<String, u32> = snap
        .local_workloads("node-a")
        .zip(1..)
        .map(|(w, ep)| (w.id(), ep))
        .collect();
    let compiled = compile(&snap, &ids, &Endpoints(&endpoints), &BTreeMap::new());
    let ipcache = crate::sync::ipcache(&snap, &ids, "node-a");
    std::hint::black_box((compiled, ipcache));
}

/// One document, parsed as the file source parses it (a file error, or an
/// object rejected, leaves nothing of it).
fn parse(doc: &Value) -> Vec<Object> {
    parse_file(Path::new("every-kind.yaml"), &format!("{doc}\n"))
        .map(|p| p.objects)
        .unwrap_or_default()
}

#[test]
fn the_corpus_is_taken_whole() {
    let parsed = parse_file(Path::new("every-kind.yaml"), CORPUS).expect("yaml");
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    assert!(parsed.ignored.is_empty(), "{:?}", parsed.ignored);
    assert_eq!(parsed.objects.len(), 16);
}

#[test]
fn a_spoiled_value_never_panics() {
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(CORPUS)
        .map(|d| Value::deserialize(d).expect("yaml"))
        .collect();
    // The other documents' objects are parsed once; each case parses its
    // spoiled document and takes it with them.
    let base: Vec<Vec<Object>> = docs.iter().map(parse).collect();
    let (mut cases, mut accepted) = (0, 0);
    let mut panics = Vec::new();
    for (n, doc) in docs.iter().enumerate() {
        let others: Vec<Object> = base
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != n)
            .flat_map(|(_, objects)| objects.iter().cloned())
            .collect();
        take(&others);
        let mut all = Vec::new();
        places(doc, &mut Vec::new(), &mut all);
        for (place, path) in all.iter().enumerate() {
            for (what, spoiled) in spoilings(doc, path, place) {
                cases += 1;
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    let taken = parse(&spoiled);
                    // Rejected: the others alone, taken once below.
                    if !taken.is_empty() {
                        accepted += 1;
                        let mut objects = others.clone();
                        objects.extend(taken);
                        take(&objects);
                    }
                }));
                if outcome.is_err() {
                    panics.push(format!("{} {path:?} {what}", doc["kind"]));
                }
            }
        }
    }
    // Most spoilings are refused; enough must be taken to reach the build.
    assert!(
        cases > 3_000 && accepted > 500,
        "{cases} cases, {accepted} taken"
    );
    assert!(
        panics.is_empty(),
        "{} of {cases} cases panicked:\n{}",
        panics.len(),
        panics.join("\n")
    );
}
