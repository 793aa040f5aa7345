//! `pvc:NAMESPACE/CLAIM` as a snapshot source or restore target, and
//! `ferry plan`: claims resolved through the Kubernetes API to a node and a
//! path under its kubelet directory; the job goes to that node's agent
//! (agents are named after their node, as the DaemonSet does).

use anyhow::{Result, anyhow, bail};
use ferry_kube::{Kube, Placement};

use crate::commands::print;
use crate::ui::human_bytes;
use crate::{Global, KubeArgs, RemoteArgs};

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

/// A claim placed on its node, with the helper pod that mounts it (if
/// ferry had to start one).
pub struct Claimed {
    pub placement: Placement,
    helper: Option<(Kube, ferry_kube::Helper)>,
}

impl Claimed {
    pub fn has_helper(&self) -> bool {
        self.helper.is_some()
    }

    /// Deletes the helper pod; a failure is a warning that says how to do it
    /// by hand (the job's own outcome is what the command reports).
    pub async fn release(self) {
        if let Some((kube, h)) = self.helper
            && let Err(e) = h.stop(&kube).await
        {
            eprintln!(
                "warning: helper pod {}/{} not deleted ({e}): kubectl -n {} delete pod {}",
                h.namespace, h.name, h.namespace, h.name
            );
        }
    }
}

/// Resolves the claim (starting a helper pod with `--mount-helper` when no
/// running pod mounts it) and checks its node has an agent.
pub async fn place(
    g: &Global,
    k: &KubeArgs,
    ns: &str,
    claim: &str,
    read_only: bool,
) -> Result<Claimed> {
    if g.coordinator.is_none() {
        bail!(
            "pvc:{ns}/{claim}: a claim is moved by the agent on its node: pass --coordinator URL"
        );
    }
    let kube = kube(k)?;
    let opts = k.mount_helper.then(|| ferry_kube::HelperOptions {
        image: k.helper_image.clone(),
        read_only,
        timeout: std::time::Duration::from_secs(k.helper_timeout),
    });
    let (p, helper) =
        ferry_kube::resolve_mounting(&kube, ns, claim, &k.kubelet_dir, opts.as_ref()).await?;
    let claimed = Claimed {
        placement: p,
        helper: helper.map(|h| (kube, h)),
    };
    let agents = match crate::fleet::fleet_client(g)?.agents().await {
        Ok(a) => a,
        Err(e) => {
            claimed.release().await;
            return Err(e.into());
        }
    };
    let node = &claimed.placement.node;
    if !agents.iter().any(|a| &a.name == node) {
        let msg = format!(
            "claim {ns}/{claim} is on node {node}, which has no agent (agents are named after their node: \
             run the DaemonSet, or `ferry agent --name {node}` there)"
        );
        claimed.release().await;
        bail!(msg);
    }
    Ok(claimed)
}

/// Runs a claim's job on its node's agent (an explicit `--agent` must be
/// that one: the path exists only on that node), then deletes the helper
/// pod if there is one. With a helper pod the job is always followed to its
/// end: the pod must outlive it.
pub async fn run_on_node(
    g: &Global,
    claimed: Claimed,
    mut remote: RemoteArgs,
    spec: impl FnOnce(&Placement) -> ferry_fleet::spec::JobSpec,
) -> Result<u8> {
    let r = async {
        remote.agent = Some(agent_for(&claimed.placement, remote.agent.take())?);
        remote.wait |= claimed.has_helper();
        let client = crate::fleet::client(g, &remote)?
            .ok_or_else(|| anyhow!("a claim's job needs --coordinator URL"))?;
        crate::fleet::run_job(g, &client, &remote, spec(&claimed.placement)).await
    }
    .await;
    claimed.release().await;
    r
}

fn agent_for(p: &Placement, given: Option<String>) -> Result<String> {
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
