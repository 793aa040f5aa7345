//! Quiescing an application by its claims: the Deployments and
//! StatefulSets whose pods mount them are scaled to zero (their replica
//! counts remembered), and scaled back (rollback) or scaled up on the
//! target cluster (resume) afterwards. The data is then still: no pod
//! writes it, which is what a final delta needs.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{Error, Kube, Result};

/// A workload and the replicas it had before ferry scaled it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub namespace: String,
    /// `StatefulSet` or `Deployment`.
    pub kind: String,
    pub name: String,
    pub replicas: i64,
}

impl Workload {
    fn resource(&self) -> &'static str {
        if self.kind == "StatefulSet" {
            "statefulsets"
        } else {
            "deployments"
        }
    }

    fn scale_path(&self) -> String {
        format!(
            "/apis/apps/v1/namespaces/{}/{}/{}/scale",
            self.namespace,
            self.resource(),
            self.name
        )
    }

    pub fn describe(&self) -> String {
        format!(
            "{}/{} {}",
            self.kind.to_lowercase(),
            self.name,
            self.namespace
        )
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct List<T> {
    items: Vec<T>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Meta {
    name: String,
    owner_references: Vec<Owner>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct Owner {
    kind: String,
    name: String,
    controller: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Pod {
    metadata: Meta,
    spec: PodSpec,
    status: Phase,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PodSpec {
    volumes: Vec<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Phase {
    phase: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Owned {
    metadata: Meta,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Scale {
    spec: ScaleSpec,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ScaleSpec {
    replicas: i64,
}

fn mounts(p: &Pod, claim: &str) -> bool {
    p.spec.volumes.iter().any(|v| {
        v.pointer("/persistentVolumeClaim/claimName")
            .and_then(|c| c.as_str())
            == Some(claim)
    })
}

/// Pods of `ns` that mount `claim` and have not ended (ferry's own helper
/// pods aside).
async fn live_pods(kube: &Kube, ns: &str, claim: &str) -> Result<Vec<Pod>> {
    let pods: List<Pod> = kube
        .get_opt(&format!("/api/v1/namespaces/{ns}/pods"))
        .await?
        .unwrap_or_default();
    Ok(pods
        .items
        .into_iter()
        .filter(|p| {
            !matches!(p.status.phase.as_str(), "Succeeded" | "Failed")
                && !p.metadata.name.starts_with("ferry-mount-")
                && mounts(p, claim)
        })
        .collect())
}

fn controller(m: &Meta) -> Option<&Owner> {
    m.owner_references.iter().find(|o| o.controller)
}

/// The Deployments and StatefulSets whose pods mount `ns/claim`, with
/// their replica counts now.
pub async fn owners(kube: &Kube, ns: &str, claim: &str) -> Result<Vec<Workload>> {
    let mut out: Vec<Workload> = Vec::new();
    for p in live_pods(kube, ns, claim).await? {
        let owner = controller(&p.metadata).cloned();
        let (kind, name) = match owner {
            Some(o) if o.kind == "StatefulSet" => ("StatefulSet", o.name),
            Some(o) if o.kind == "ReplicaSet" => {
                let rs: Owned = kube
                    .get_opt(&format!(
                        "/apis/apps/v1/namespaces/{ns}/replicasets/{}",
                        o.name
                    ))
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("no replicaset {ns}/{}", o.name)))?;
                match controller(&rs.metadata) {
                    Some(d) if d.kind == "Deployment" => ("Deployment", d.name.clone()),
                    _ => return Err(unowned(ns, &p.metadata.name, claim)),
                }
            }
            _ => return Err(unowned(ns, &p.metadata.name, claim)),
        };
        if out.iter().any(|w| w.kind == kind && w.name == name) {
            continue;
        }
        let mut w = Workload {
            namespace: ns.to_string(),
            kind: kind.to_string(),
            name,
            replicas: 0,
        };
        let s: Scale = kube
            .get_opt(&w.scale_path())
            .await?
            .ok_or_else(|| Error::NotFound(format!("no {}", w.describe())))?;
        w.replicas = s.spec.replicas;
        out.push(w);
    }
    Ok(out)
}

fn unowned(ns: &str, pod: &str, claim: &str) -> Error {
    Error::Unusable(format!(
        "pod {ns}/{pod} mounting claim {claim} belongs to no Deployment or StatefulSet: \
         ferry cannot scale it; stop it with --quiesce-cmd instead"
    ))
}

/// Sets `w`'s replicas to `replicas`.
pub async fn scale(kube: &Kube, w: &Workload, replicas: i64) -> Result<()> {
    kube.merge_patch(
        &w.scale_path(),
        &serde_json::json!({"spec": {"replicas": replicas}}),
    )
    .await
}

/// Waits until no pod mounts `ns/claim` any more.
pub async fn wait_unmounted(kube: &Kube, ns: &str, claim: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let live = live_pods(kube, ns, claim).await?;
        if live.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::Unusable(format!(
                "pod {ns}/{} still mounts claim {claim} after {}s",
                live[0].metadata.name,
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
