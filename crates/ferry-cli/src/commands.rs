//! One function per command: open what it needs, call ferry-core, print.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use ferry_catalog::SqliteCatalog;
use ferry_core::catalog::Catalog;
use ferry_core::config::VaultOptions;
use ferry_core::restore::RestoreOptions;
use ferry_core::snapshot::SnapshotOptions;
use ferry_core::vault::{Location, Vault};
use serde::Serialize;

use crate::ui::{Bar, human_bytes};
use crate::{CatalogCmd, Cli, Command, Global, VaultCmd};

pub async fn run(cli: Cli) -> Result<u8> {
    let g = &cli.global;
    match cli.command {
        Command::Vault(VaultCmd::Init {
            location,
            chunk_min,
            chunk_avg,
            chunk_max,
            pack_size,
            compression_level,
        }) => {
            let loc = location_of(location.as_deref(), g)?;
            let mut opts = VaultOptions::default();
            let small = |v: u64| u32::try_from(v).map_err(|_| anyhow!("size {v} too large"));
            if let Some(v) = chunk_min {
                opts.chunker.min = small(v)?;
            }
            if let Some(v) = chunk_avg {
                opts.chunker.avg = small(v)?;
            }
            if let Some(v) = chunk_max {
                opts.chunker.max = small(v)?;
            }
            if let Some(v) = pack_size {
                opts.pack_size = small(v)?;
            }
            if let Some(v) = compression_level {
                opts.compression.level = v;
            }
            let pass = passphrase(g)?;
            let cfg = Vault::init(&loc, &pass, &opts).await?;
            #[derive(Serialize)]
            struct Out<'a> {
                vault: String,
                vault_id: &'a str,
                chunker: &'a ferry_core::config::ChunkerParams,
                pack_size: u32,
            }
            print(
                g,
                &Out {
                    vault: loc.to_string(),
                    vault_id: &cfg.vault_id,
                    chunker: &cfg.chunker,
                    pack_size: cfg.pack_size,
                },
                || format!("created vault {} at {loc}", cfg.vault_id),
            )?;
            Ok(0)
        }
        Command::Vault(VaultCmd::Check {
            location,
            read_data,
        }) => {
            let (vault, catalog) = open(location.as_deref(), g).await?;
            let report = ferry_core::check::check(&vault, catalog.as_ref(), read_data).await?;
            print(g, &report, || {
                let mut s = format!(
                    "checked {} snapshots, {} packs{}",
                    report.snapshots,
                    report.packs,
                    if read_data {
                        format!(
                            ", read {} packs and verified {} blobs",
                            report.packs_read, report.blobs_verified
                        )
                    } else {
                        String::new()
                    }
                );
                for d in &report.damaged_packs {
                    s.push_str(&format!("\ndamaged pack {}: {}", d.pack, d.reason));
                }
                for a in &report.affected {
                    s.push_str(&format!(
                        "\naffected: {}@{} {}: {}",
                        a.volume,
                        &a.snapshot[..8.min(a.snapshot.len())],
                        a.path,
                        a.reason
                    ));
                }
                s.push_str(if report.ok {
                    "\nno errors found"
                } else {
                    "\nthe vault is damaged"
                });
                s
            })?;
            if report.ok {
                Ok(0)
            } else {
                eprintln!(
                    "error: vault {} is damaged: {} damaged pack(s), {} missing blob(s), {} affected file(s)",
                    vault.name(),
                    report.damaged_packs.len(),
                    report.missing_blobs.len(),
                    report.affected.len()
                );
                Ok(1)
            }
        }
        Command::Snapshot {
            source,
            volume,
            reread,
        } => {
            let (vault, catalog) = open(None, g).await?;
            let bar = Arc::new(Bar::new("snapshot"));
            let mut opts = SnapshotOptions::new(volume);
            opts.reread = reread;
            let r =
                ferry_core::snapshot::snapshot(vault, catalog, &source, &opts, bar.clone()).await;
            bar.finish();
            let s = r?;
            print(g, &s, || {
                format!(
                    "snapshot {} of {} saved: {} files, {} read, {} new, {} uploaded in {:.1}s{}",
                    &s.snapshot_id[..8],
                    s.volume,
                    s.files,
                    human_bytes(s.bytes_scanned),
                    human_bytes(s.bytes_new),
                    human_bytes(s.bytes_uploaded),
                    s.duration_s,
                    if s.incomplete {
                        format!(" (INCOMPLETE: {} warnings)", s.warnings)
                    } else {
                        String::new()
                    }
                )
            })?;
            if s.incomplete {
                eprintln!(
                    "warning: snapshot {} is incomplete: {} entries could not be read",
                    &s.snapshot_id[..8],
                    s.warnings
                );
                return Ok(3);
            }
            Ok(0)
        }
        Command::Snapshots { volume } => {
            let (_vault, catalog) = open(None, g).await?;
            let list: Vec<_> = catalog
                .snapshots()?
                .into_iter()
                .filter(|s| volume.as_ref().is_none_or(|v| &s.volume == v))
                .collect();
            #[derive(Serialize)]
            struct Out<'a> {
                snapshots: &'a [ferry_core::manifest::SnapshotRecord],
            }
            print(g, &Out { snapshots: &list }, || {
                let mut s = format!(
                    "{:<10} {:<21} {:<20} {:>8} {:>11}  {}",
                    "ID", "TIME", "VOLUME", "FILES", "SIZE", "HOST"
                );
                for r in &list {
                    s.push_str(&format!(
                        "\n{:<10} {:<21} {:<20} {:>8} {:>11}  {}{}",
                        &r.id[..8],
                        r.time,
                        r.volume,
                        r.files,
                        human_bytes(r.bytes),
                        r.host,
                        if r.incomplete { "  (incomplete)" } else { "" }
                    ));
                }
                s.push_str(&format!("\n{} snapshot(s)", list.len()));
                s
            })?;
            Ok(0)
        }
        Command::Restore { snapshot, target } => {
            let (vault, catalog) = open(None, g).await?;
            let snap = ferry_core::sync::find_snapshot(catalog.as_ref(), &snapshot)?;
            let bar = Arc::new(Bar::new("restore"));
            let r = ferry_core::restore::restore(
                vault,
                catalog,
                &snap,
                &target,
                &RestoreOptions::default(),
                bar.clone(),
            )
            .await;
            bar.finish();
            let s = r?;
            print(g, &s, || {
                format!(
                    "restored snapshot {} of {} into {}: {} files, {} written in {:.1}s",
                    &s.snapshot_id[..8],
                    s.volume,
                    target.display(),
                    s.files_written,
                    human_bytes(s.bytes_written),
                    s.duration_s
                )
            })?;
            Ok(0)
        }
        Command::Catalog(CatalogCmd::Rebuild) => {
            let loc = location_of(None, g)?;
            let vault = Vault::open(&loc, &passphrase(g)?).await?;
            let path = catalog_path(g, &vault);
            for suffix in ["", "-wal", "-shm"] {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("removing old catalog {}", Path::new(&p).display())
                        });
                    }
                }
            }
            let (catalog, _) = SqliteCatalog::open(&path, vault.id())?;
            let s = ferry_core::sync::sync_catalog(&vault, &catalog, true).await?;
            #[derive(Serialize)]
            struct Out<'a> {
                catalog: String,
                #[serde(flatten)]
                summary: &'a ferry_core::sync::SyncSummary,
            }
            print(
                g,
                &Out {
                    catalog: path.display().to_string(),
                    summary: &s,
                },
                || {
                    format!(
                        "rebuilt catalog {}: {} index objects, {} packs from headers, {} snapshots",
                        path.display(),
                        s.index_objects,
                        s.packs_from_headers,
                        s.snapshots
                    )
                },
            )?;
            Ok(0)
        }
    }
}

fn location_of(positional: Option<&str>, g: &Global) -> Result<Location> {
    let s = positional
        .or(g.vault.as_deref())
        .ok_or_else(|| anyhow!("no vault given: pass --vault VAULT or set FERRY_VAULT"))?;
    Ok(Location::parse(s)?)
}

fn passphrase(g: &Global) -> Result<Vec<u8>> {
    if let Some(f) = &g.passphrase_file {
        let s =
            std::fs::read(f).with_context(|| format!("reading passphrase file {}", f.display()))?;
        let line = s.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            bail!("passphrase file {} is empty", f.display());
        }
        return Ok(line.to_vec());
    }
    match std::env::var_os("FERRY_PASSPHRASE") {
        Some(p) if !p.is_empty() => {
            use std::os::unix::ffi::OsStrExt;
            Ok(p.as_bytes().to_vec())
        }
        _ => bail!("no passphrase: set FERRY_PASSPHRASE or pass --passphrase-file FILE"),
    }
}

fn catalog_path(g: &Global, vault: &Vault) -> std::path::PathBuf {
    g.catalog
        .clone()
        .unwrap_or_else(|| ferry_catalog::default_path(vault.id()))
}

/// Opens the vault and its embedded catalog, bringing the catalog up to
/// date with the vault (a new catalog is filled from the vault).
async fn open(positional: Option<&str>, g: &Global) -> Result<(Arc<Vault>, Arc<dyn Catalog>)> {
    let loc = location_of(positional, g)?;
    let vault = Vault::open(&loc, &passphrase(g)?).await?;
    let path = catalog_path(g, &vault);
    let (catalog, fresh) = SqliteCatalog::open(&path, vault.id())?;
    ferry_core::sync::sync_catalog(&vault, &catalog, fresh).await?;
    Ok((Arc::new(vault), Arc::new(catalog)))
}

/// JSON on stdout with --json, else the human text.
fn print<T: Serialize>(g: &Global, value: &T, human: impl FnOnce() -> String) -> Result<()> {
    if g.json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{}", human());
    }
    Ok(())
}
