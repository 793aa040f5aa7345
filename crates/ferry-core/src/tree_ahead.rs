//! A snapshot's directory trees fetched ahead of a walk that visits them in
//! their order: depth first, subdirectories in name order. The snapshot's
//! walk of its source (against the parent's trees) and the restore's check
//! of its target (against the trees the target holds) both visit trees in
//! that order, less the directories their side lacks. With a coordinator
//! each catalog call is a round trip that a busy machine stretches to a
//! millisecond or more, and a link between networks tens: a thread of their
//! own fetches the trees up to [`PER_CALL`] per call, grandchildren too (not
//! one directory's children per call), up to [`CALLS_IN_FLIGHT`] calls at
//! once, so that the walk does not wait for them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::id::BlobId;
use crate::manifest::{NodeKind, Tree};
use crate::vault::Vault;

/// Where trees are read: the catalog's cache, else the vault.
#[derive(Clone)]
pub(crate) struct TreeSource {
    pub(crate) vault: Arc<Vault>,
    pub(crate) catalog: Arc<dyn Catalog>,
    pub(crate) rt: tokio::runtime::Handle,
}

impl TreeSource {
    /// Those of the trees `ids` that the catalog has cached, in one call;
    /// the others are read one by one with [`TreeSource::tree`].
    pub(crate) fn cached(&self, ids: &[BlobId]) -> HashMap<BlobId, Tree> {
        if ids.is_empty() {
            return HashMap::new();
        }
        crate::sync::cached_trees(self.catalog.as_ref(), ids).unwrap_or_default()
    }

    /// The tree, if it can be read. Call from a thread outside the runtime.
    pub(crate) fn tree(&self, id: &BlobId) -> Option<Tree> {
        self.rt
            .block_on(crate::sync::load_tree(
                &self.vault,
                self.catalog.as_ref(),
                id,
            ))
            .ok()
    }
}

/// Trees asked of the catalog in one call.
const PER_CALL: usize = 64;

/// Trees fetched ahead of the walk and not yet taken by it.
const TREES_QUEUED: usize = 64;

/// A snapshot's trees, sent by a thread of their own in the walk's order
/// (see the module doc).
pub(crate) struct TreesAhead {
    rx: Option<crossbeam_channel::Receiver<(BlobId, Option<Tree>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    source: TreeSource,
}

impl TreesAhead {
    /// Starts fetching the trees below `root` (and `root` itself first).
    pub(crate) fn start(source: TreeSource, root: BlobId) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(TREES_QUEUED);
        let s = source.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-trees-ahead".into())
            .spawn(move || prefetch(&s, root, &tx))
            .ok();
        TreesAhead {
            rx: thread.is_some().then_some(rx),
            thread,
            source,
        }
    }

    /// The tree `id`, if it can be read. The walk asks in the prefetch's
    /// order, less the directories its side lacks: trees sent before `id`
    /// are theirs and are dropped. Should the walk ever ask out of that
    /// order, the rest is read one by one, as without a prefetch.
    pub(crate) fn take(&self, id: &BlobId) -> Option<Tree> {
        if let Some(rx) = &self.rx {
            for (got, tree) in rx.iter() {
                if got == *id {
                    return tree;
                }
            }
        }
        self.source.tree(id)
    }
}

impl Drop for TreesAhead {
    fn drop(&mut self) {
        // Hung up, the prefetch stops at its next send.
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Trees fetched ahead of their turn, at most (besides the queue): the
/// prefetch's memory.
const TREES_FETCHED_MAX: usize = 512;

/// Calls in flight at once, at most: over a link with real latency the
/// walk would otherwise wait a round trip per [`PER_CALL`] trees.
const CALLS_IN_FLIGHT: usize = 4;

/// Sends the trees below `root` in the walk's order.
fn prefetch(p: &TreeSource, root: BlobId, tx: &crossbeam_channel::Sender<(BlobId, Option<Tree>)>) {
    type Answer = (Vec<BlobId>, HashMap<BlobId, Tree>);
    let (ask_tx, ask_rx) = crossbeam_channel::bounded::<Vec<BlobId>>(CALLS_IN_FLIGHT);
    let (got_tx, got_rx) = crossbeam_channel::bounded::<Answer>(CALLS_IN_FLIGHT);
    std::thread::scope(|s| {
        for _ in 0..CALLS_IN_FLIGHT {
            let (ask_rx, got_tx) = (ask_rx.clone(), got_tx.clone());
            s.spawn(move || {
                for ids in ask_rx {
                    let got = p.cached(&ids);
                    if got_tx.send((ids, got)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(got_tx);
        let mut calls = Calls {
            ask: ask_tx,
            answers: got_rx,
            in_flight: HashSet::new(),
            outstanding: 0,
            fetched: HashMap::new(),
        };
        walk(p, root, tx, &mut calls);
        // Dropping `calls` hangs up: the callers end after their call.
    });
}

/// The prefetch's catalog calls: those in flight and what they fetched.
struct Calls {
    ask: crossbeam_channel::Sender<Vec<BlobId>>,
    answers: crossbeam_channel::Receiver<(Vec<BlobId>, HashMap<BlobId, Tree>)>,
    /// Asked for and not answered yet.
    in_flight: HashSet<BlobId>,
    outstanding: usize,
    /// Asked for ahead of their turn: the tree, or `None` where the catalog
    /// has not cached it (read from the vault in its turn).
    fetched: HashMap<BlobId, Option<Tree>>,
}

impl Calls {
    fn ask(&mut self, ids: Vec<BlobId>) -> bool {
        self.in_flight.extend(ids.iter().copied());
        self.outstanding += 1;
        self.ask.send(ids).is_ok()
    }

    fn answer(&mut self, (ids, mut got): (Vec<BlobId>, HashMap<BlobId, Tree>)) {
        self.outstanding -= 1;
        for i in ids {
            self.in_flight.remove(&i);
            self.fetched.insert(i, got.remove(&i));
        }
    }

    /// Asks for more of the walk's next trees while calls are free and the
    /// bound allows: full calls only, so that a fast catalog still gets its
    /// trees in a few large calls, not many small ones.
    fn top_up(&mut self, todo: &[BlobId]) {
        while let Ok(a) = self.answers.try_recv() {
            self.answer(a);
        }
        while self.outstanding < CALLS_IN_FLIGHT
            && self.fetched.len() + self.in_flight.len() + PER_CALL <= TREES_FETCHED_MAX
        {
            let ids = next_unfetched(todo, &self.fetched, &self.in_flight, PER_CALL);
            let worth =
                ids.len() == PER_CALL || (self.outstanding == 0 && ids.len() >= PER_CALL / 4);
            if !worth || !self.ask(ids) {
                break;
            }
        }
    }

    /// Waits until tree `id` is fetched, asking for it (and what follows it
    /// in the walk) if no call has.
    fn fetch(&mut self, todo: &[BlobId], id: BlobId) -> Option<()> {
        while !self.fetched.contains_key(&id) {
            if !self.in_flight.contains(&id) {
                // The walk waits: what it needs next comes first, up to
                // twice the bound (calls that went past a directory in
                // flight may have filled it with later trees).
                let ids = match self.fetched.len() + self.in_flight.len() < 2 * TREES_FETCHED_MAX {
                    true => next_unfetched(todo, &self.fetched, &self.in_flight, PER_CALL),
                    false => vec![id],
                };
                if !self.ask(ids) {
                    return None;
                }
            }
            let a = self.answers.recv().ok()?;
            self.answer(a);
        }
        Some(())
    }
}

/// The walk's order: sends each tree in its turn, fetched ahead by `calls`.
fn walk(
    p: &TreeSource,
    root: BlobId,
    tx: &crossbeam_channel::Sender<(BlobId, Option<Tree>)>,
    calls: &mut Calls,
) {
    // Directories still to send, the next one last.
    let mut todo: Vec<BlobId> = vec![root];
    while let Some(&id) = todo.last() {
        if calls.fetch(&todo, id).is_none() {
            return;
        }
        todo.pop();
        let tree = match calls.fetched.remove(&id) {
            Some(Some(t)) => Some(t),
            _ => p.tree(&id),
        };
        let at = todo.len();
        todo.extend(tree.iter().flat_map(subdirs));
        todo[at..].reverse();
        calls.top_up(&todo);
        if tx.send((id, tree)).is_err() {
            return;
        }
    }
}

fn subdirs(tree: &Tree) -> impl Iterator<Item = BlobId> + '_ {
    tree.entries.iter().filter_map(|n| match &n.kind {
        NodeKind::Dir { subtree } => Some(*subtree),
        _ => None,
    })
}

/// The next `n` trees of the walk's order not yet fetched, as far as it is
/// known: below the trees already fetched, whose subdirectories are known,
/// so that a call asks for grandchildren too, not only one directory's
/// children. `todo` ends with the next tree to send, which is not fetched.
fn next_unfetched(
    todo: &[BlobId],
    fetched: &HashMap<BlobId, Option<Tree>>,
    in_flight: &HashSet<BlobId>,
    n: usize,
) -> Vec<BlobId> {
    // Only the next few places matter: bounded work per call, whatever the
    // width of a directory.
    let mut stack: Vec<BlobId> = todo[todo.len().saturating_sub(4 * n)..].to_vec();
    let (mut out, mut seen, mut visited) = (Vec::new(), HashSet::new(), 0);
    while let Some(id) = stack.pop() {
        visited += 1;
        if out.len() >= n || visited > 16 * n {
            break;
        }
        match fetched.get(&id) {
            Some(Some(t)) => {
                let next: Vec<BlobId> = subdirs(t).take(4 * n).collect();
                stack.extend(next.into_iter().rev());
            }
            // Read from the vault in its turn: what lies below is unknown.
            Some(None) => {}
            // Asked for: what lies below is not known yet.
            None if in_flight.contains(&id) => {}
            None => {
                if seen.insert(id) {
                    out.push(id);
                }
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::manifest::{Name, Node, SnapshotRecord};
    use crate::pack::PackRecord;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Trees only, as a catalog caches them; counts the calls for them,
    /// answers each after `delay` (a round trip), and records how many
    /// were in flight at once.
    #[derive(Default)]
    pub(crate) struct TreeCatalog {
        pub(crate) trees: HashMap<BlobId, Vec<u8>>,
        pub(crate) calls: AtomicU64,
        pub(crate) delay: std::time::Duration,
        pub(crate) in_flight: AtomicU64,
        pub(crate) most_in_flight: AtomicU64,
    }

    impl Catalog for TreeCatalog {
        fn trees(&self, ids: &[BlobId]) -> crate::catalog::CatalogResult<Vec<Option<Vec<u8>>>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(ids.iter().map(|i| self.trees.get(i).cloned()).collect())
        }
        fn tree(&self, id: &BlobId) -> crate::catalog::CatalogResult<Option<Vec<u8>>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok(self.trees.get(id).cloned())
        }
        fn contains(&self, _: &[BlobId]) -> crate::catalog::CatalogResult<Vec<bool>> {
            unreachable!()
        }
        fn locate(
            &self,
            _: &[BlobId],
        ) -> crate::catalog::CatalogResult<Vec<Option<crate::catalog::BlobLocation>>> {
            unreachable!()
        }
        fn add_packs(&self, _: &[PackRecord]) -> crate::catalog::CatalogResult<()> {
            unreachable!()
        }
        fn packs(&self) -> crate::catalog::CatalogResult<Vec<(crate::id::PackId, u64)>> {
            unreachable!()
        }
        fn pack_blobs(&self, _: &crate::id::PackId) -> crate::catalog::CatalogResult<Vec<BlobId>> {
            unreachable!()
        }
        fn add_snapshot(&self, _: &SnapshotRecord) -> crate::catalog::CatalogResult<()> {
            unreachable!()
        }
        fn snapshots(&self) -> crate::catalog::CatalogResult<Vec<SnapshotRecord>> {
            unreachable!()
        }
        fn put_tree(&self, _: &BlobId, _: &[u8]) -> crate::catalog::CatalogResult<()> {
            unreachable!()
        }
        fn seen_objects(&self) -> crate::catalog::CatalogResult<HashSet<String>> {
            unreachable!()
        }
        fn mark_seen(&self, _: &[String]) -> crate::catalog::CatalogResult<()> {
            unreachable!()
        }
        fn remove_snapshots(&self, _: &[String]) -> crate::catalog::CatalogResult<()> {
            unreachable!()
        }
        fn remove_packs(&self, _: &[crate::id::PackId]) -> crate::catalog::CatalogResult<()> {
            unreachable!()
        }
        fn blob_sizes(
            &self,
        ) -> crate::catalog::CatalogResult<Vec<(BlobId, crate::id::PackId, u32)>> {
            unreachable!()
        }
    }

    /// A node of `kind`, its metadata zero.
    pub(crate) fn node(name: &str, kind: NodeKind) -> Node {
        Node {
            name: Name(name.as_bytes().to_vec()),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            inode: 0,
            xattrs: vec![],
        }
    }

    /// A directory `width` wide and `depth` deep below `path`, each holding
    /// a file named after its path (so trees differ) except the leaves
    /// under `same`, which are equal: the same id at several places.
    /// Pushes (path, id) in the walk's order.
    pub(crate) fn build(
        path: &str,
        width: usize,
        depth: usize,
        trees: &mut HashMap<BlobId, Vec<u8>>,
        order: &mut Vec<(String, BlobId)>,
    ) -> BlobId {
        let at = order.len();
        order.push((path.to_string(), BlobId([0; 32])));
        let mut entries = vec![];
        if !(depth == 0 && path.starts_with("/same")) {
            let file = NodeKind::File {
                size: 0,
                chunks: vec![],
            };
            entries.push(node(&format!("f{}", path.replace('/', "-")), file));
        }
        if depth > 0 {
            for k in 0..width {
                let sub = build(&format!("{path}/d{k}"), width, depth - 1, trees, order);
                entries.push(node(&format!("d{k}"), NodeKind::Dir { subtree: sub }));
            }
        }
        entries.sort_by(|a, b| a.name.0.cmp(&b.name.0));
        let tree = Tree { entries };
        let bytes = tree.encode_cached();
        let id = BlobId(*blake3::hash(&bytes).as_bytes());
        trees.insert(id, bytes);
        order[at].1 = id;
        id
    }

    /// A root holding one [`build`] directory per `(name, width, depth)`,
    /// its paths suffixed with `suffix` (another suffix, other trees of
    /// the same shape). Pushes (path, id) in the walk's order, the root
    /// first; returns the root's id.
    pub(crate) fn build_root(
        dirs: &[(&str, usize, usize)],
        suffix: &str,
        trees: &mut HashMap<BlobId, Vec<u8>>,
        order: &mut Vec<(String, BlobId)>,
    ) -> BlobId {
        let at = order.len();
        let mut root = Tree::default();
        for (name, width, depth) in dirs {
            let sub = build(&format!("/{name}{suffix}"), *width, *depth, trees, order);
            root.entries
                .push(node(name, NodeKind::Dir { subtree: sub }));
        }
        let bytes = root.encode_cached();
        let root_id = BlobId(*blake3::hash(&bytes).as_bytes());
        trees.insert(root_id, bytes);
        order.insert(at, ("/".into(), root_id));
        root_id
    }

    /// The walk takes the parent's trees from the prefetch in its order,
    /// with directories gone from the source skipped, in a few batched
    /// calls; asked out of order, it still gets the right trees.
    #[test]
    fn parent_trees_come_ahead_of_the_walk_in_its_order() {
        let (mut trees, mut order) = (HashMap::new(), vec![]);
        let dirs = [("a", 6, 3), ("same", 3, 1), ("z", 2, 2)];
        let root_id = build_root(&dirs, "", &mut trees, &mut order);
        let dirs = order.len();
        assert_eq!(dirs, 1 + 259 + 4 + 7);
        let distinct: HashSet<BlobId> = order.iter().map(|o| o.1).collect();
        assert_eq!(
            distinct.len(),
            dirs - 2,
            "the three leaves under /same are equal"
        );

        let rt = tokio::runtime::Runtime::new().unwrap();
        let d = tempfile::tempdir().unwrap();
        let vault = test_vault(&rt, d.path());
        let catalog = Arc::new(TreeCatalog {
            trees,
            ..Default::default()
        });
        let source = TreeSource {
            vault,
            catalog: catalog.clone(),
            rt: rt.handle().clone(),
        };
        let tree_of = |id: &BlobId| Tree::decode_cached(&catalog.trees[id]).unwrap();

        // The whole walk: every tree right, 271 directories in a few calls
        // (one call per directory's subdirectories would be 1 + 1 + 3 + 6
        // + 36 + 3 + 2 + 2 = 54).
        let ahead = TreesAhead::start(source.clone(), root_id);
        for (path, id) in &order {
            assert_eq!(ahead.take(id), Some(tree_of(id)), "{path}");
        }
        drop(ahead);
        let calls = catalog.calls.swap(0, Ordering::Relaxed);
        assert!(calls <= 12, "{calls} calls for {dirs} directories");

        // /a/d1 and /same/d0 gone from the source: the walk skips their
        // trees; nothing is read one by one.
        let ahead = TreesAhead::start(source.clone(), root_id);
        let gone = |p: &str| p.starts_with("/a/d1") || p.starts_with("/same/d0");
        for (path, id) in order.iter().filter(|(p, _)| !gone(p)) {
            assert_eq!(ahead.take(id), Some(tree_of(id)), "{path}");
        }
        drop(ahead);
        let calls = catalog.calls.swap(0, Ordering::Relaxed);
        assert!(calls <= 12, "{calls} calls with directories gone");

        // Out of the prefetch's order (never so in a walk): still the right
        // trees, read one by one once the order is lost.
        let ahead = TreesAhead::start(source, root_id);
        let (last, first) = (order[dirs - 1].1, order[1].1);
        assert_eq!(ahead.take(&last), Some(tree_of(&last)));
        assert_eq!(ahead.take(&first), Some(tree_of(&first)));
        assert_eq!(ahead.take(&root_id), Some(tree_of(&root_id)));
    }

    /// A vault for tests, with a cheap key derivation.
    pub(crate) fn test_vault(rt: &tokio::runtime::Runtime, dir: &Path) -> Arc<Vault> {
        let loc = crate::vault::Location::Local(dir.join("v"));
        let mut opts = crate::config::VaultOptions::default();
        (opts.kdf.m_kib, opts.kdf.t) = (64, 1);
        rt.block_on(async {
            Vault::init(&loc, b"pw", &opts).await.unwrap();
            Arc::new(Vault::open(&loc, b"pw").await.unwrap())
        })
    }

    /// Over a catalog a round trip away, calls overlap: the prefetch keeps
    /// several in flight where the walk's next trees are known, instead of
    /// one round trip per call's worth of trees.
    #[test]
    fn over_a_slow_catalog_calls_overlap() {
        let (mut trees, mut order) = (HashMap::new(), vec![]);
        let root_id = build_root(&[("a", 7, 3), ("b", 7, 3)], "", &mut trees, &mut order);
        assert_eq!(order.len(), 1 + 2 * (1 + 7 + 49 + 343));

        let rt = tokio::runtime::Runtime::new().unwrap();
        let d = tempfile::tempdir().unwrap();
        let catalog = Arc::new(TreeCatalog {
            trees,
            delay: std::time::Duration::from_millis(20),
            ..Default::default()
        });
        let source = TreeSource {
            vault: test_vault(&rt, d.path()),
            catalog: catalog.clone(),
            rt: rt.handle().clone(),
        };
        let ahead = TreesAhead::start(source, root_id);
        for (path, id) in &order {
            let want = Tree::decode_cached(&catalog.trees[id]).unwrap();
            assert_eq!(ahead.take(id), Some(want), "{path}");
        }
        drop(ahead);
        let most = catalog.most_in_flight.load(Ordering::SeqCst);
        let calls = catalog.calls.load(Ordering::SeqCst);
        assert!(most >= 2, "at most {most} call in flight");
        assert!(most <= CALLS_IN_FLIGHT as u64, "{most} calls in flight");
        assert!(calls <= 24, "{calls} calls for {} directories", order.len());
    }
}
