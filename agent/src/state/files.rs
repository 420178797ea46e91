//! The file source: a folder of YAML objects, polled for changes.
//!
//! A changed file is re-read; a file that is not valid YAML is retried on
//! the next polls (a write in progress) and, once it stays broken past the
//! debounce, reported while its previous objects keep serving. Each object is
//! validated on its own: a rejected object keeps its last good version, the
//! other objects of the file apply. A removed file's objects are deleted.
//!
//! Polling (every [`POLL`]) rather than inotify: it sees every change on any
//! file system (ConfigMap mounts swap symlinks, which inotify watches lose),
//! costs a `stat` per file, and keeps "maps reflect a change within 1 s".

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use tracing::{info, warn};

use super::objects::{Object, ObjectKey, parse_file};

/// How often the folder is checked.
pub const POLL: Duration = Duration::from_millis(200);
/// How long a file may stay invalid YAML before it is reported as broken.
pub const DEBOUNCE: Duration = Duration::from_millis(600);

#[derive(Debug, Default)]
struct FileState {
    fingerprint: Option<(SystemTime, u64)>,
    objects: BTreeMap<ObjectKey, Object>,
    /// Since when the file has been unreadable as YAML, and whether that was reported.
    broken_since: Option<(Instant, bool)>,
}

/// Outcome counts of the folder's reloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReloadStats {
    pub ok: u64,
    pub failed: u64,
}

/// A watched folder of YAML objects.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    stats: ReloadStats,
    /// The first poll always yields the state, even an empty one.
    loaded: bool,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            stats: ReloadStats::default(),
            loaded: false,
        }
    }

    pub fn stats(&self) -> ReloadStats {
        self.stats
    }

    /// Looks for changes; returns every current object when something changed.
    pub fn poll(&mut self) -> Option<Vec<Object>> {
        let mut changed = !self.loaded;
        let present = match yaml_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot list the config folder; keeping the last state");
                return None;
            }
        };
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|f| !present.contains(f))
            .cloned()
            .collect();
        for file in gone {
            let state = self.files.remove(&file).unwrap_or_default();
            info!(file = %file.display(), objects = state.objects.len(), "config file removed; deleting its objects");
            changed = true;
        }
        for file in present {
            changed |= self.check(&file);
        }
        self.loaded = true;
        changed.then(|| self.objects())
    }

    /// Every file's objects in key order; later files win when two define
    /// the same object. Each file's are sorted already, so they are merged
    /// in one pass: no key is copied and no map is built, which at 20,000
    /// pods was a fifth of a change's CPU.
    fn objects(&self) -> Vec<Object> {
        let mut files: Vec<_> = self
            .files
            .values()
            .map(|s| s.objects.iter().peekable())
            .collect();
        // Each file's next key, smallest first, then by file.
        let mut heads: BinaryHeap<_> = files
            .iter_mut()
            .enumerate()
            .filter_map(|(file, objects)| Some(Reverse((objects.peek()?.0, file))))
            .collect();
        let mut all = Vec::with_capacity(self.files.values().map(|s| s.objects.len()).sum());
        // Equal keys come off in file order, so the last one taken wins.
        let mut kept: Option<(&ObjectKey, &Object)> = None;
        while let Some(Reverse((_, file))) = heads.pop() {
            let Some((key, object)) = files[file].next() else {
                continue;
            };
            if let Some((next, _)) = files[file].peek() {
                heads.push(Reverse((*next, file)));
            }
            if let Some((_, done)) = kept.take_if(|(k, _)| *k != key) {
                all.push(done.clone());
            }
            kept = Some((key, object));
        }
        all.extend(kept.map(|(_, object)| object.clone()));
        all
    }

    /// Re-reads `file` if it changed (or is still pending); true if its objects changed.
    fn check(&mut self, file: &Path) -> bool {
        let fingerprint = std::fs::metadata(file)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let state = self.files.entry(file.to_path_buf()).or_default();
        if state.fingerprint == fingerprint && state.broken_since.is_none() {
            return false;
        }
        state.fingerprint = fingerprint;
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                warn!(file = %file.display(), error = %e, "cannot read config file; keeping its last objects");
                return false;
            }
        };
        let parsed = match parse_file(file, &text) {
            Ok(parsed) => parsed,
            Err(err) => {
                let now = Instant::now();
                let (since, reported) = state.broken_since.get_or_insert((now, false));
                if !*reported && now.duration_since(*since) >= DEBOUNCE {
                    *reported = true;
                    self.stats.failed += 1;
                    warn!(error = %err, "config file rejected; its last good objects keep serving");
                }
                return false;
            }
        };
        state.broken_since = None;
        let mut objects: BTreeMap<ObjectKey, Object> =
            parsed.objects.into_iter().map(|o| (o.key(), o)).collect();
        let rejected = parsed.rejected.len();
        for (key, err) in parsed.rejected {
            match key.and_then(|k| state.objects.get(&k).map(|o| (k, o.clone()))) {
                Some((key, last_good)) => {
                    warn!(error = %err, "object rejected; its last good version keeps serving");
                    objects.insert(key, last_good);
                }
                None => warn!(error = %err, "object rejected"),
            }
        }
        for what in parsed.ignored {
            info!(file = %file.display(), "{what}");
        }
        if rejected == 0 {
            self.stats.ok += 1
        } else {
            self.stats.failed += 1
        }
        let changed = objects != state.objects;
        if changed {
            info!(file = %file.display(), objects = objects.len(), rejected, "config file applied");
        }
        state.objects = objects;
        changed
    }
}

/// `*.yaml` and `*.yml` in `dir`, sorted; hidden files (editors' temporaries) skipped.
fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            !name.starts_with('.')
                && (name.ends_with(".yaml") || name.ends_with(".yml"))
                && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    struct Dir(TempDir);
    impl Dir {
        fn new(name: &str) -> Self {
            Self(TempDir::new(&format!("state-{name}")))
        }
        fn write(&self, name: &str, text: &str) {
            // A new length or mtime: tests write faster than mtime granularity.
            let path = self.0.path().join(name);
            std::fs::write(&path, text).expect("write");
            let f = std::fs::File::options()
                .write(true)
                .open(&path)
                .expect("open");
            f.set_modified(SystemTime::now() + Duration::from_secs(rand_secs()))
                .expect("mtime");
        }
    }
    fn rand_secs() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(1);
        N.fetch_add(1, Ordering::Relaxed)
    }
    fn names(objects: &[Object]) -> Vec<String> {
        objects.iter().map(|o| o.key().to_string()).collect()
    }
    const NS_A: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
    const NS_B: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n";
    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {ports: [{port: 80}]}\n";
    const SVC_BAD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {ports: [{port: 0}]}\n";

    #[test]
    fn files_merge_in_key_order_and_a_later_file_wins_a_key() {
        let dir = Dir::new("merge");
        let mut src = FileSource::new(dir.0.path());
        let svc = |port| SVC.replace("port: 80", &format!("port: {port}"));
        let ns_a = |label| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: a, labels: {{v: \"{label}\"}}}}\n"
            )
        };
        dir.write("1.yaml", &format!("{}---\n{NS_B}---\n{}", ns_a(1), svc(81)));
        dir.write("2.yaml", &svc(82));
        dir.write("3.yaml", &format!("{}---\n{NS_B}", ns_a(3)));
        dir.write("4.yaml", "");
        let merged = src.poll().expect("loaded");
        // What a map of every object, later files written over earlier
        // ones, holds.
        let mut by_key = BTreeMap::new();
        for state in src.files.values() {
            for (key, object) in &state.objects {
                by_key.insert(key.clone(), object.clone());
            }
        }
        assert_eq!(merged, by_key.into_values().collect::<Vec<_>>());
        assert_eq!(
            names(&merged),
            ["Namespace a", "Namespace b", "Service a/s"]
        );
        let Object::Namespace(a) = &merged[0] else {
            panic!("{merged:?}")
        };
        assert_eq!(a.metadata.labels.as_ref().expect("labels")["v"], "3");
        let Object::Service(s) = &merged[2] else {
            panic!("{merged:?}")
        };
        assert_eq!(
            s.spec
                .as_ref()
                .expect("spec")
                .ports
                .as_ref()
                .expect("ports")[0]
                .port,
            82
        );
    }

    #[test]
    fn add_change_remove() {
        let dir = Dir::new("acr");
        let mut src = FileSource::new(dir.0.path());
        assert_eq!(src.poll().map(|o| names(&o)), Some(vec![]));
        dir.write("one.yaml", NS_A);
        assert_eq!(
            src.poll().map(|o| names(&o)),
            Some(vec!["Namespace a".to_owned()])
        );
        assert_eq!(src.poll(), None, "nothing changed");
        dir.write("one.yaml", &format!("{NS_A}---\n{NS_B}"));
        assert_eq!(
            names(&src.poll().expect("changed")),
            ["Namespace a", "Namespace b"]
        );
        std::fs::remove_file(dir.0.path().join("one.yaml")).expect("rm");
        assert_eq!(src.poll().map(|o| names(&o)), Some(vec![]));
    }

    #[test]
    fn a_rejected_object_keeps_its_last_good_version() {
        let dir = Dir::new("lastgood");
        let mut src = FileSource::new(dir.0.path());
        dir.write("m.yaml", &format!("{SVC}---\n{NS_A}"));
        src.poll().expect("first");
        dir.write("m.yaml", &format!("{SVC_BAD}---\n{NS_A}---\n{NS_B}"));
        let objects = src.poll().expect("namespace b added");
        assert_eq!(
            names(&objects),
            ["Namespace a", "Namespace b", "Service a/s"]
        );
        let svc = objects
            .iter()
            .find(|o| o.key().kind == "Service")
            .expect("svc");
        assert_eq!(
            svc,
            &parse_file(Path::new("x"), SVC).expect("ok").objects[0],
            "the old, valid port"
        );
        assert_eq!(src.stats().failed, 1);
    }

    #[test]
    fn broken_yaml_is_retried_then_reported_and_the_old_objects_stay() {
        let dir = Dir::new("broken");
        let mut src = FileSource::new(dir.0.path());
        dir.write("m.yaml", NS_A);
        src.poll().expect("first");
        dir.write("m.yaml", "apiVersion: v1\nkind: [half-writ");
        assert_eq!(src.poll(), None, "keeps serving namespace a");
        assert_eq!(src.stats().failed, 0, "not reported inside the debounce");
        std::thread::sleep(DEBOUNCE);
        assert_eq!(src.poll(), None);
        assert_eq!(src.stats().failed, 1, "reported once stale");
        dir.write("m.yaml", &format!("{NS_A}---\n{NS_B}"));
        assert_eq!(
            names(&src.poll().expect("fixed")),
            ["Namespace a", "Namespace b"]
        );
    }
}
