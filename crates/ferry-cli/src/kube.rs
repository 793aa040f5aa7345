//! `pvc:NAMESPACE/CLAIM` as a snapshot source or restore target, and
//! `ferry plan`: claims resolved through the Kubernetes API to a node and a
//! path under its kubelet directory; the job goes to that node's agent
//! (agents are named after their node, as the DaemonSet does).

use anyhow::{Result, anyhow, bail};
use ferry_kube::{Kube, Placement};

use crate::commands::print;
use crate::ui::human_bytes;
use crate::{Global, KubeArgs};

/// `NAMESPACE/CLAIM` of a `pvc:` argument, or None for anything else.
pub fn claim_of(arg: &std::path::Path) -> Result<Option<(String, String)>> {
    let Some(rest) = arg.to_str().and_then(|s| s.strip_prefix("pvc:")) else {
        return Ok(None);
    };
    match rest.split_once('/') {
        Some((ns, c)) if !ns.is_empty() && !c.is_empty() && !c.contains('/') => {
            Ok(Some((ns.to_string(), c.to_string())))
        }
        _ => bail!("pvc:{rest}: name a claim as pvc:NAMESPACE/CLAIM"),
    }
}

fn kube(k: &KubeArgs) -> Result<Kube> {
    Ok(Kube::new(k.kubeconfig.as_deref())?)
}

/// Resolves the claim and checks its node has an agent.
pub async fn place(g: &Global, k: &KubeArgs, ns: &str, claim: &str) -> Result<Placement> {
    if g.coordinator.is_none() {
        bail!(
            "pvc:{ns}/{claim}: a claim is moved by the agent on its node: pass --coordinator URL"
        );
    }
    let p = ferry_kube::resolve(&kube(k)?, ns, claim, &k.kubelet_dir).await?;
    let agents = crate::fleet::fleet_client(g)?.agents().await?;
    if !agents.iter().any(|a| a.name == p.node) {
        bail!(
            "claim {ns}/{claim} is on node {}, which has no agent (agents are named after their node: \
             run the DaemonSet, or `ferry agent --name {}` there)",
            p.node,
            p.node
        );
    }
    Ok(p)
}

/// The agent for a claim's job: its node's (an explicit `--agent` must be
/// that one: the path exists only on that node).
pub fn agent_for(p: &Placement, given: Option<String>) -> Result<String> {
    match given {
        Some(a) if a != p.node => bail!(
            "claim {}/{} is on node {}: --agent {a} cannot reach it (drop --agent)",
            p.namespace,
            p.claim,
            p.node
        ),
        _ => Ok(p.node.clone()),
    }
}

/// `ferry plan`.
pub async fn plan(
    g: &Global,
    k: &KubeArgs,
    namespace: Option<String>,
    selector: Option<String>,
    class_map: Vec<String>,
) -> Result<u8> {
    let kube = kube(k)?;
    let ns = namespace.unwrap_or_else(|| kube.namespace.clone());
    let map = class_map
        .iter()
        .map(|m| {
            m.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("--storage-class-map {m:?}: write OLD=NEW"))
        })
        .collect::<Result<Vec<_>>>()?;
    let rows = ferry_kube::plan(&kube, &ns, selector.as_deref(), &map).await?;
    #[derive(serde::Serialize)]
    struct Out<'a> {
        namespace: &'a str,
        claims: &'a [ferry_kube::PlanRow],
        total_bytes: u64,
    }
    let total: u64 = rows.iter().map(|r| r.size_bytes).sum();
    print(
        g,
        &Out {
            namespace: &ns,
            claims: &rows,
            total_bytes: total,
        },
        || {
            let mut s = format!(
                "{:<28} {:>9} {:<11} {:<20} {:<20} {:<16} POD",
                "CLAIM", "SIZE", "MODE", "STORAGE CLASS", "TARGET CLASS", "NODE"
            );
            for r in &rows {
                s.push_str(&format!(
                    "\n{:<28} {:>9} {:<11} {:<20} {:<20} {:<16} {}",
                    r.claim,
                    r.size,
                    r.volume_mode,
                    r.storage_class.as_deref().unwrap_or("-"),
                    r.target_storage_class.as_deref().unwrap_or("-"),
                    r.node.as_deref().unwrap_or("(not mounted)"),
                    r.pod.as_deref().unwrap_or("-"),
                ));
            }
            s.push_str(&format!(
                "\n{} claim(s) in {ns}, {} in all",
                rows.len(),
                human_bytes(total)
            ));
            if rows.iter().any(|r| r.node.is_none()) {
                s.push_str(
                    "\nclaims no running pod mounts cannot be moved until one does (a helper pod will do)",
                );
            }
            s
        },
    )?;
    Ok(0)
}
