//! From a claim to where its data is on a node.
//!
//! The kubelet mounts a pod's persistent volume at
//! `KUBELET/pods/POD_UID/volumes/PLUGIN/PV_NAME` (plus `/mount` for CSI)
//! and maps a block volume at `KUBELET/pods/POD_UID/volumeDevices/PLUGIN/
//! PV_NAME`, where PLUGIN is `kubernetes.io~csi` or the in-tree plugin's
//! escaped name (`kubernetes.io~aws-ebs`, `kubernetes.io~nfs`, ...). So a
//! claim's data is found through a running pod that mounts it: the pod
//! gives the node and its uid, the claim the volume, the volume the plugin.
//! A hostPath volume is the one exception: its path on the node is in the
//! volume itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Helper, HelperOptions, Kube, Result};

#[derive(Deserialize, Default)]
#[serde(default)]
struct List<T> {
    items: Vec<T>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct Meta {
    name: String,
    namespace: String,
    uid: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Pod {
    metadata: Meta,
    spec: PodSpec,
    status: PodStatus,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodSpec {
    node_name: String,
    volumes: Vec<PodVolume>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodVolume {
    persistent_volume_claim: Option<ClaimSource>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ClaimSource {
    claim_name: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PodStatus {
    phase: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Claim {
    metadata: Meta,
    spec: ClaimSpec,
    status: ClaimStatus,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ClaimSpec {
    volume_name: String,
    storage_class_name: Option<String>,
    volume_mode: Option<String>,
    resources: Resources,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Resources {
    requests: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ClaimStatus {
    phase: String,
    capacity: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Volume {
    spec: serde_json::Value,
}

/// Where a claim's data is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub namespace: String,
    pub claim: String,
    pub pod: String,
    pub pod_uid: String,
    pub node: String,
    pub volume: String,
    /// A raw block volume (a device), not a filesystem.
    pub block: bool,
    /// The directory (or device) on the node.
    pub path: PathBuf,
}

/// The kubelet's directory name for a volume's plugin, from the volume's
/// spec, and whether its filesystem is under `mount` (CSI).
fn plugin(spec: &serde_json::Value) -> Option<(String, bool)> {
    if spec.get("csi").is_some() {
        return Some(("kubernetes.io~csi".into(), true));
    }
    if let Some(d) = spec.pointer("/flexVolume/driver").and_then(|d| d.as_str()) {
        return Some((d.replace('/', "~"), false));
    }
    const IN_TREE: &[(&str, &str)] = &[
        ("awsElasticBlockStore", "aws-ebs"),
        ("gcePersistentDisk", "gce-pd"),
        ("azureDisk", "azure-disk"),
        ("azureFile", "azure-file"),
        ("cinder", "cinder"),
        ("nfs", "nfs"),
        ("iscsi", "iscsi"),
        ("rbd", "rbd"),
        ("cephfs", "cephfs"),
        ("fc", "fc"),
        ("glusterfs", "glusterfs"),
        ("local", "local-volume"),
        ("vsphereVolume", "vsphere-volume"),
        ("portworxVolume", "portworx-volume"),
    ];
    IN_TREE
        .iter()
        .find(|(k, _)| spec.get(k).is_some())
        .map(|(_, dir)| (format!("kubernetes.io~{dir}"), false))
}

async fn claim(kube: &Kube, ns: &str, name: &str) -> Result<Claim> {
    kube.get_opt(&format!(
        "/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}"
    ))
    .await?
    .ok_or_else(|| Error::NotFound(format!("no claim {name} in namespace {ns}")))
}

/// The running pods of `ns` that mount claim `name`.
async fn pods_mounting(kube: &Kube, ns: &str, name: &str) -> Result<Vec<Pod>> {
    let pods: List<Pod> = kube
        .get_opt(&format!("/api/v1/namespaces/{ns}/pods"))
        .await?
        .unwrap_or_default();
    Ok(pods
        .items
        .into_iter()
        .filter(|p| {
            p.status.phase == "Running"
                && p.spec.volumes.iter().any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == name)
                })
        })
        .collect())
}

/// Finds where the data of claim `ns/name` is: the node and the path under
/// `kubelet_dir` (the kubelet's root directory on that node). A claim that
/// no running pod mounts is [`Error::NotMounted`].
pub async fn resolve(kube: &Kube, ns: &str, name: &str, kubelet_dir: &Path) -> Result<Placement> {
    let c = claim(kube, ns, name).await?;
    if c.status.phase == "Pending" {
        // WaitForFirstConsumer: the volume is made where the first pod
        // that uses the claim is scheduled; a helper pod is such a pod.
        return Err(Error::NotMounted(format!(
            "claim {ns}/{name} is Pending: its volume is made when a pod first mounts it: \
             pass --mount-helper (ferry starts a pod that mounts it and deletes it afterwards), \
             or start one that does"
        )));
    }
    if c.status.phase != "Bound" || c.spec.volume_name.is_empty() {
        return Err(Error::Unusable(format!(
            "claim {ns}/{name} is not bound to a volume (phase {:?})",
            c.status.phase
        )));
    }
    let pv = &c.spec.volume_name;
    let volume: Volume = kube
        .get_opt(&format!("/api/v1/persistentvolumes/{pv}"))
        .await?
        .ok_or_else(|| Error::NotFound(format!("claim {ns}/{name}: no volume {pv}")))?;
    let pod = pods_mounting(kube, ns, name)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| {
            Error::NotMounted(format!(
                "no running pod mounts claim {ns}/{name}: pass --mount-helper (ferry starts a \
                 pod that mounts it and deletes it afterwards), or start one that does"
            ))
        })?;
    if pod.spec.node_name.is_empty() || pod.metadata.uid.is_empty() {
        return Err(Error::Unusable(format!(
            "pod {ns}/{} mounting claim {name} has no node or uid yet",
            pod.metadata.name
        )));
    }
    let block = c.spec.volume_mode.as_deref() == Some("Block");
    let path = if let Some(host) = volume
        .spec
        .pointer("/hostPath/path")
        .and_then(|p| p.as_str())
    {
        PathBuf::from(host)
    } else {
        let (dir, csi) = plugin(&volume.spec).ok_or_else(|| {
            Error::Unusable(format!(
                "volume {pv} of claim {ns}/{name}: unknown volume plugin (spec keys: {})",
                volume
                    .spec
                    .as_object()
                    .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            ))
        })?;
        let pod_dir = kubelet_dir.join("pods").join(&pod.metadata.uid);
        if block {
            pod_dir.join("volumeDevices").join(dir).join(pv)
        } else if csi {
            pod_dir.join("volumes").join(dir).join(pv).join("mount")
        } else {
            pod_dir.join("volumes").join(dir).join(pv)
        }
    };
    Ok(Placement {
        namespace: ns.into(),
        claim: name.into(),
        pod: pod.metadata.name,
        pod_uid: pod.metadata.uid,
        node: pod.spec.node_name,
        volume: pv.clone(),
        block,
        path,
    })
}

/// As [`resolve`], but a claim that no running pod mounts gets a helper
/// pod when `helper` says how (see [`crate::helper`]); the caller stops it
/// when the job is over.
pub async fn resolve_mounting(
    kube: &Kube,
    ns: &str,
    name: &str,
    kubelet_dir: &Path,
    helper: Option<&HelperOptions>,
) -> Result<(Placement, Option<Helper>)> {
    let opts = match (resolve(kube, ns, name, kubelet_dir).await, helper) {
        (Ok(p), _) => return Ok((p, None)),
        (Err(Error::NotMounted(_)), Some(o)) => o,
        (Err(e), _) => return Err(e),
    };
    let block = claim(kube, ns, name).await?.spec.volume_mode.as_deref() == Some("Block");
    let h = Helper::start(kube, ns, name, block, opts).await?;
    match resolve(kube, ns, name, kubelet_dir).await {
        Ok(p) => Ok((p, Some(h))),
        Err(e) => {
            let _ = h.stop(kube).await;
            Err(e)
        }
    }
}

/// One claim to move, for `ferry plan`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanRow {
    pub namespace: String,
    pub claim: String,
    pub phase: String,
    /// As the cluster states it (`10Gi`): capacity, else the request.
    pub size: String,
    pub size_bytes: u64,
    pub storage_class: Option<String>,
    /// The class on the target (`--storage-class-map old=new`).
    pub target_storage_class: Option<String>,
    pub volume_mode: String,
    pub volume: String,
    /// The node of a running pod that mounts it, if any.
    pub node: Option<String>,
    pub pod: Option<String>,
}

/// Parses a Kubernetes quantity (`10Gi`, `500M`, `1.5Ti`, `1024`) into bytes.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        _ => return None,
    };
    Some((n * mult).round() as u64)
}

/// The claims of `ns` (those matching `selector`, a label selector) with
/// what moving them involves.
pub async fn plan(
    kube: &Kube,
    ns: &str,
    selector: Option<&str>,
    class_map: &[(String, String)],
) -> Result<Vec<PlanRow>> {
    let mut path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims");
    if let Some(s) = selector {
        path.push_str(&format!("?labelSelector={}", encode(s)));
    }
    let claims: List<Claim> = kube.get_opt(&path).await?.unwrap_or_default();
    let pods: List<Pod> = kube
        .get_opt(&format!("/api/v1/namespaces/{ns}/pods"))
        .await?
        .unwrap_or_default();
    let mut rows = Vec::new();
    for c in claims.items {
        let name = c.metadata.name.clone();
        let pod = pods.items.iter().find(|p| {
            p.status.phase == "Running"
                && p.spec.volumes.iter().any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|s| s.claim_name == name)
                })
        });
        let size = c
            .status
            .capacity
            .get("storage")
            .or_else(|| c.spec.resources.requests.get("storage"))
            .cloned()
            .unwrap_or_default();
        let class = c.spec.storage_class_name.clone();
        let target = class.as_ref().map(|k| {
            class_map
                .iter()
                .find(|(from, _)| from == k)
                .map(|(_, to)| to.clone())
                .unwrap_or_else(|| k.clone())
        });
        rows.push(PlanRow {
            namespace: if c.metadata.namespace.is_empty() {
                ns.to_string()
            } else {
                c.metadata.namespace.clone()
            },
            claim: name,
            phase: c.status.phase.clone(),
            size_bytes: quantity_bytes(&size).unwrap_or(0),
            size,
            storage_class: class,
            target_storage_class: target,
            volume_mode: c
                .spec
                .volume_mode
                .clone()
                .unwrap_or_else(|| "Filesystem".into()),
            volume: c.spec.volume_name.clone(),
            node: pod.map(|p| p.spec.node_name.clone()),
            pod: pod.map(|p| p.metadata.name.clone()),
        });
    }
    rows.sort_by(|a, b| a.claim.cmp(&b.claim));
    Ok(rows)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_and_quantities() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(
            plugin(&v(r#"{"csi":{"driver":"ebs.csi.aws.com"}}"#)),
            Some(("kubernetes.io~csi".into(), true))
        );
        assert_eq!(
            plugin(&v(r#"{"awsElasticBlockStore":{"volumeID":"vol-1"}}"#)),
            Some(("kubernetes.io~aws-ebs".into(), false))
        );
        assert_eq!(
            plugin(&v(r#"{"flexVolume":{"driver":"alicloud/disk"}}"#)),
            Some(("alicloud~disk".into(), false))
        );
        assert_eq!(plugin(&v(r#"{"capacity":{}}"#)), None);
        assert_eq!(quantity_bytes("10Gi"), Some(10 << 30));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("1.5Ki"), Some(1536));
        assert_eq!(quantity_bytes("12"), Some(12));
        assert_eq!(quantity_bytes("3X"), None);
        assert_eq!(
            encode("app=db,tier in (a)"),
            "app%3Ddb%2Ctier%20in%20%28a%29"
        );
    }
}
