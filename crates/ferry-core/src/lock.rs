//! Vault locks: what keeps prune from deleting a chunk that a running
//! snapshot has just deduplicated against.
//!
//! Snapshots, restores and checks hold a *shared* lock; prune holds an
//! *exclusive* one. A lock is a sealed, create-only object `locks/<random>`
//! (so it cannot be forged or read without the keys). To take a lock: write
//! it, then list the others; on conflict, delete it and wait or fail. Two
//! processes racing both see each other and both back off, which is safe.
//! A holder refreshes its lock every [`REFRESH`] by writing a new object
//! and deleting the old one (objects are never overwritten). A lock not
//! refreshed for [`STALE`], or held by a process that no longer exists on
//! this host, is ignored: a killed process cannot block the vault forever.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::vault::Vault;

pub const REFRESH: Duration = Duration::from_secs(5 * 60);
pub const STALE: Duration = Duration::from_secs(30 * 60);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub exclusive: bool,
    /// What holds it: `snapshot`, `restore`, `prune`, ...
    pub operation: String,
    pub host: String,
    pub pid: u32,
    pub time: String,
    pub time_ns: i64,
}

impl LockRecord {
    fn describe(&self) -> String {
        format!(
            "{} (pid {} on {}, since {})",
            self.operation, self.pid, self.host, self.time
        )
    }

    fn is_stale(&self, now_ns: i64, host: &str) -> bool {
        if now_ns - self.time_ns > STALE.as_nanos() as i64 {
            return true;
        }
        // Same host: a process that is gone holds nothing.
        self.host == host && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// A held lock. Call [`VaultLock::release`]; dropping it only stops the
/// refreshes (the object then goes stale, or dies with the process).
pub struct VaultLock {
    vault: Arc<Vault>,
    name: Arc<Mutex<String>>,
    refresher: tokio::task::JoinHandle<()>,
}

impl VaultLock {
    /// Takes a lock, waiting up to `wait` for a conflicting one to go.
    pub async fn acquire(
        vault: Arc<Vault>,
        exclusive: bool,
        operation: &str,
        wait: Duration,
    ) -> Result<VaultLock> {
        let started = std::time::Instant::now();
        let mut announced = false;
        loop {
            let record = LockRecord {
                exclusive,
                operation: operation.into(),
                host: host(),
                pid: std::process::id(),
                time: crate::vault::now_rfc3339(),
                time_ns: now_ns(),
            };
            let name = format!("locks/{}", crate::id::random_hex_id());
            vault.put_meta(&name, &record).await?;
            match conflict(&vault, &name, exclusive).await {
                Ok(None) => {
                    let name = Arc::new(Mutex::new(name));
                    let refresher = tokio::spawn(refresh(vault.clone(), name.clone(), record));
                    return Ok(VaultLock {
                        vault,
                        name,
                        refresher,
                    });
                }
                Ok(Some(holder)) => {
                    vault.delete(&name).await?;
                    if started.elapsed() >= wait {
                        return Err(Error::Locked {
                            vault: vault.name().into(),
                            holder,
                        });
                    }
                    if !announced {
                        tracing::warn!("vault is locked by {holder}; waiting");
                        announced = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    let _ = vault.delete(&name).await;
                    return Err(e);
                }
            }
        }
    }

    pub async fn release(self) -> Result<()> {
        self.refresher.abort();
        let name = self.name.lock().expect("poisoned").clone();
        self.vault.delete(&name).await
    }
}

impl Drop for VaultLock {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Another live lock that conflicts with ours, described.
async fn conflict(vault: &Vault, ours: &str, exclusive: bool) -> Result<Option<String>> {
    let (now, host) = (now_ns(), host());
    for obj in vault.list("locks/").await? {
        let name = obj.location.to_string();
        if name == ours {
            continue;
        }
        let other: LockRecord = match vault.get_meta(&name).await {
            Ok(r) => r,
            // Released between the list and the read.
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        if other.is_stale(now, &host) {
            continue;
        }
        if exclusive || other.exclusive {
            return Ok(Some(other.describe()));
        }
    }
    Ok(None)
}

async fn refresh(vault: Arc<Vault>, name: Arc<Mutex<String>>, mut record: LockRecord) {
    loop {
        tokio::time::sleep(REFRESH).await;
        record.time = crate::vault::now_rfc3339();
        record.time_ns = now_ns();
        let fresh = format!("locks/{}", crate::id::random_hex_id());
        if let Err(e) = vault.put_meta(&fresh, &record).await {
            tracing::warn!("refreshing the vault lock: {e}");
            continue;
        }
        let old = std::mem::replace(&mut *name.lock().expect("poisoned"), fresh);
        if let Err(e) = vault.delete(&old).await {
            tracing::warn!("removing the old vault lock: {e}");
        }
    }
}

/// Runs `work` under a shared lock, after bringing the catalog up to date:
/// a prune that ran while this waited for the lock has moved or deleted
/// packs, and the catalog must know before anything is read or deduplicated.
pub async fn shared<T>(
    vault: &Arc<Vault>,
    catalog: &dyn crate::catalog::Catalog,
    operation: &str,
    wait: Duration,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let lock = VaultLock::acquire(vault.clone(), false, operation, wait).await?;
    let r = match crate::sync::sync_catalog(vault, catalog, false).await {
        Ok(_) => work.await,
        Err(e) => Err(e),
    };
    let released = lock.release().await;
    let v = r?;
    released?;
    Ok(v)
}

/// How long snapshots, restores and checks wait for a running prune.
pub const SHARED_WAIT: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shared_locks_coexist_exclusive_ones_do_not() {
        let d = tempfile::tempdir().unwrap();
        let loc = crate::vault::Location::Local(d.path().join("v"));
        std::fs::create_dir_all(d.path().join("v")).unwrap();
        Vault::init(&loc, b"pw", &Default::default()).await.unwrap();
        let v = Arc::new(Vault::open(&loc, b"pw").await.unwrap());
        let z = Duration::ZERO;

        let a = VaultLock::acquire(v.clone(), false, "snapshot", z)
            .await
            .unwrap();
        let b = VaultLock::acquire(v.clone(), false, "restore", z)
            .await
            .unwrap();
        let e = VaultLock::acquire(v.clone(), true, "prune", z).await;
        assert!(
            matches!(&e, Err(Error::Locked { holder, .. }) if holder.contains("snapshot") || holder.contains("restore")),
            "{:?}",
            e.err()
        );
        a.release().await.unwrap();
        b.release().await.unwrap();
        assert!(
            v.list("locks/").await.unwrap().is_empty(),
            "released locks are gone"
        );

        let p = VaultLock::acquire(v.clone(), true, "prune", z)
            .await
            .unwrap();
        let s = VaultLock::acquire(v.clone(), false, "snapshot", z).await;
        assert!(matches!(&s, Err(Error::Locked { holder, .. }) if holder.contains("prune")));
        // A waiting snapshot gets the lock once prune releases it.
        let waiter = tokio::spawn(VaultLock::acquire(
            v.clone(),
            false,
            "snapshot",
            Duration::from_secs(30),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.release().await.unwrap();
        waiter.await.unwrap().unwrap().release().await.unwrap();
    }

    #[test]
    fn a_lock_of_a_dead_process_or_too_old_is_stale() {
        let now = now_ns();
        let mut r = LockRecord {
            exclusive: true,
            operation: "prune".into(),
            host: host(),
            pid: std::process::id(),
            time: String::new(),
            time_ns: now,
        };
        assert!(!r.is_stale(now, &host()));
        r.pid = u32::MAX - 1;
        assert!(r.is_stale(now, &host()), "no such process here");
        assert!(
            !r.is_stale(now, "another-host"),
            "a remote pid proves nothing"
        );
        r.time_ns = now - STALE.as_nanos() as i64 - 1;
        assert!(r.is_stale(now, "another-host"));
    }
}
