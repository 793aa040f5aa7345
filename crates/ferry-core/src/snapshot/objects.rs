//! The snapshot reader for a bucket: the listing, in key order, becomes
//! the same items a directory walk produces (see `crate::objects` for the
//! mapping). Keys sharing a prefix are contiguous in key order, so each
//! directory opens and closes once; entries come out of name order
//! (`a-b` before `a/x`), and the collector sorts each tree.

use std::collections::HashSet;

use super::{Item, Items, Job, Previous, Stats, chunk_reader, warn};
use crate::config::ChunkerParams;
use crate::error::Result;
use crate::manifest::{Name, Node, NodeKind, Tree};
use crate::objects::{self, ObjectEntry, ObjectSource};
use crate::progress::Progress;
use crate::source;

struct OpenDir {
    name: String,
    /// Names already given in this directory (a key `a` and keys `a/...`
    /// cannot both be kept).
    names: HashSet<String>,
    /// The parent snapshot's tree for this directory.
    old: Option<Tree>,
}

fn old_node<'a>(old: &'a Option<Tree>, name: &str) -> Option<&'a Node> {
    old.as_ref()?.entry(name.as_bytes())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn read_objects(
    src: &dyn ObjectSource,
    chunker: ChunkerParams,
    previous: Option<Previous>,
    items: &Items,
    jobs: &crossbeam_channel::Sender<Job>,
    stats: &Stats,
    progress: &dyn Progress,
) -> Result<()> {
    let send = |item: Item| items.send(item);
    let root_old = previous.as_ref().and_then(|p| p.tree(&p.root));
    send(Item::EnterDir {
        name: Name(b".".to_vec()),
        md: objects::DIR_META,
        xattrs: vec![],
        parent_tree: previous.as_ref().map(|p| p.root),
    })?;
    let mut stack = vec![OpenDir {
        name: String::new(),
        names: HashSet::new(),
        old: root_old,
    }];
    let name = src.name();
    for entry in src.list() {
        let e = entry.map_err(|e| crate::Error::Invalid(format!("listing {name}: {e}")))?;
        let Some((dirs, file)) = objects::key_path(&e.key) else {
            warn(
                stats,
                progress,
                format!("{}: this key cannot be a path; skipped", e.key),
            );
            continue;
        };
        // Close the directories this key is not under.
        let common = stack[1..]
            .iter()
            .zip(&dirs)
            .take_while(|(d, n)| d.name == **n)
            .count();
        while stack.len() > common + 1 {
            stack.pop();
            send(Item::LeaveDir)?;
        }
        // Open the ones it is under.
        let mut refused = false;
        for d in &dirs[common..] {
            let top = stack.last_mut().expect("root stays");
            if !top.names.insert(d.to_string()) {
                refused = true;
                break;
            }
            let parent_tree = match (&previous, old_node(&top.old, d).map(|n| &n.kind)) {
                (Some(_), Some(NodeKind::Dir { subtree })) => Some(*subtree),
                _ => None,
            };
            let old = match (&previous, parent_tree) {
                (Some(p), Some(id)) => p.tree(&id),
                _ => None,
            };
            send(Item::EnterDir {
                name: Name(d.as_bytes().to_vec()),
                md: objects::DIR_META,
                xattrs: vec![],
                parent_tree,
            })?;
            stack.push(OpenDir {
                name: d.to_string(),
                names: HashSet::new(),
                old,
            });
        }
        let top = stack.last_mut().expect("root stays");
        if refused || file.is_some_and(|f| !top.names.insert(f.to_string())) {
            warn(
                stats,
                progress,
                format!(
                    "{}: a file and a directory of the same name; skipped",
                    e.key
                ),
            );
            continue;
        }
        if let Some(f) = file {
            let reuse = old_node(&top.old, f).and_then(|n| {
                source::unchanged(n, &objects::object_meta(&e)).map(|c| (c, n.xattrs.clone()))
            });
            read_object(src, &e, f, reuse, &chunker, items, jobs, stats, progress)?;
        }
    }
    while stack.len() > 1 {
        stack.pop();
        send(Item::LeaveDir)?;
    }
    send(Item::LeaveDir)
}

#[allow(clippy::too_many_arguments)]
fn read_object(
    src: &dyn ObjectSource,
    e: &ObjectEntry,
    file: &str,
    reuse: Option<(Vec<crate::manifest::ChunkRef>, Vec<crate::manifest::Xattr>)>,
    chunker: &ChunkerParams,
    items: &Items,
    jobs: &crossbeam_channel::Sender<Job>,
    stats: &Stats,
    progress: &dyn Progress,
) -> Result<()> {
    let send = |item: Item| items.send(item);
    let name = Name(file.as_bytes().to_vec());
    let md = objects::object_meta(e);
    if let Some((chunks, xattrs)) = reuse {
        stats
            .unchanged
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        progress.advance(e.size);
        progress.file_done();
        return send(Item::Reused(source::node_from(
            name,
            &md,
            NodeKind::File {
                size: e.size,
                chunks,
            },
            xattrs,
        )));
    }
    let (headers, body) = match src.open(e) {
        Ok(x) => x,
        Err(err) => {
            warn(stats, progress, format!("{}: {err}", e.key));
            return Ok(());
        }
    };
    send(Item::FileStart {
        name,
        md,
        xattrs: objects::headers_to_xattrs(&headers),
    })?;
    let error = chunk_reader(body, &e.key, chunker, jobs, stats, progress, |rx| {
        send(Item::Chunk(rx))
    })?;
    progress.file_done();
    send(Item::FileEnd { error })
}
