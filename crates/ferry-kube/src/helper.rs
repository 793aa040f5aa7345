//! A helper pod for a claim that no running pod mounts.
//!
//! Data is reached through the kubelet, which lays out a volume only for a
//! pod that mounts it. When the application is scaled down (the usual state
//! at cutover) or the claim is fresh on the target cluster, ferry starts a
//! pod of its own that mounts the claim and does nothing else, waits until
//! the kubelet has mounted it, and deletes it when the job is over. The pod
//! is as small and as powerless as a pod can be: the `pause` image, no
//! service account token, no privileges, no writable root.

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::{Error, Kube, Result};

/// The label every helper pod carries, so that one a killed ferry left
/// behind is found with `kubectl delete pod -l app.kubernetes.io/managed-by=ferry`.
pub const LABEL: &str = "app.kubernetes.io/managed-by";

/// How the helper pod is made.
#[derive(Clone, Debug)]
pub struct HelperOptions {
    pub image: String,
    /// Mount the claim read-only (a snapshot's source).
    pub read_only: bool,
    /// Give up (and delete the pod) when it is not running by then.
    pub timeout: Duration,
}

/// A running helper pod; [`Helper::stop`] deletes it.
#[derive(Debug)]
pub struct Helper {
    pub namespace: String,
    pub name: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Created {
    metadata: Meta,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Meta {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PodState {
    status: Status,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Status {
    phase: String,
    message: Option<String>,
    reason: Option<String>,
}

/// The pod that mounts `claim` (as a device when `block`).
fn manifest(ns: &str, claim: &str, block: bool, o: &HelperOptions) -> serde_json::Value {
    let mut container = serde_json::json!({
        "name": "hold",
        "image": o.image,
        "resources": {
            "requests": {"cpu": "1m", "memory": "8Mi"},
            "limits": {"memory": "32Mi"}
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}
        }
    });
    if block {
        container["volumeDevices"] =
            serde_json::json!([{"name": "data", "devicePath": "/dev/ferry-data"}]);
    } else {
        container["volumeMounts"] =
            serde_json::json!([{"name": "data", "mountPath": "/data", "readOnly": o.read_only}]);
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "ferry-mount-",
            "namespace": ns,
            "labels": {LABEL: "ferry", "app.kubernetes.io/component": "mount-helper"},
            "annotations": {"ferry.io/claim": claim}
        },
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65535, "runAsGroup": 65535},
            "containers": [container],
            "volumes": [{
                "name": "data",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": o.read_only}
            }]
        }
    })
}

impl Helper {
    /// Creates the helper pod for `ns/claim` and waits until it runs (the
    /// kubelet has then mounted the volume). A pod that fails or does not
    /// start in time is deleted again and its state reported.
    pub async fn start(
        kube: &Kube,
        ns: &str,
        claim: &str,
        block: bool,
        o: &HelperOptions,
    ) -> Result<Helper> {
        let created: Created = kube
            .create(
                &format!("/api/v1/namespaces/{ns}/pods"),
                &manifest(ns, claim, block, o),
            )
            .await?;
        if created.metadata.name.is_empty() {
            return Err(Error::Unusable(format!(
                "helper pod for claim {ns}/{claim}: the API server returned no pod name"
            )));
        }
        let helper = Helper {
            namespace: ns.to_string(),
            name: created.metadata.name,
        };
        match helper.wait_running(kube, claim, o.timeout).await {
            Ok(()) => Ok(helper),
            Err(e) => {
                // Best effort: the error that matters is why it did not run.
                let _ = helper.stop(kube).await;
                Err(e)
            }
        }
    }

    fn path(&self) -> String {
        format!("/api/v1/namespaces/{}/pods/{}", self.namespace, self.name)
    }

    async fn wait_running(&self, kube: &Kube, claim: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut last: String;
        loop {
            match kube.get_opt::<PodState>(&self.path()).await? {
                Some(p) if p.status.phase == "Running" => return Ok(()),
                Some(p) if matches!(p.status.phase.as_str(), "Failed" | "Succeeded") => {
                    return Err(Error::Unusable(format!(
                        "helper pod {}/{} for claim {claim} ended ({}{})",
                        self.namespace,
                        self.name,
                        p.status.phase,
                        p.status
                            .message
                            .or(p.status.reason)
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    )));
                }
                Some(p) => last = p.status.phase,
                None => last = "gone".into(),
            }
            if start.elapsed() >= timeout {
                return Err(Error::Unusable(format!(
                    "helper pod {}/{} for claim {claim} is not running after {}s (phase {last}): \
                     see `kubectl -n {} describe pod {}`",
                    self.namespace,
                    self.name,
                    timeout.as_secs(),
                    self.namespace,
                    self.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Deletes the pod at once (no grace period: it holds no state).
    pub async fn stop(&self, kube: &Kube) -> Result<()> {
        kube.delete(&format!("{}?gracePeriodSeconds=0", self.path()))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_mounts_the_claim_read_only_as_asked_and_holds_no_power() {
        let o = HelperOptions {
            image: "registry.k8s.io/pause:3.10".into(),
            read_only: true,
            timeout: Duration::from_secs(1),
        };
        let m = manifest("shop", "data", false, &o);
        assert_eq!(m["metadata"]["generateName"], "ferry-mount-");
        assert_eq!(m["metadata"]["labels"][LABEL], "ferry");
        let v = &m["spec"]["volumes"][0]["persistentVolumeClaim"];
        assert_eq!(v["claimName"], "data");
        assert_eq!(v["readOnly"], true);
        let c = &m["spec"]["containers"][0];
        assert_eq!(c["volumeMounts"][0]["readOnly"], true);
        assert!(c.get("volumeDevices").is_none());
        assert_eq!(m["spec"]["automountServiceAccountToken"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");

        let o = HelperOptions {
            read_only: false,
            ..o
        };
        let m = manifest("shop", "raw", true, &o);
        let c = &m["spec"]["containers"][0];
        assert_eq!(c["volumeDevices"][0]["devicePath"], "/dev/ferry-data");
        assert!(c.get("volumeMounts").is_none());
        assert_eq!(
            m["spec"]["volumes"][0]["persistentVolumeClaim"]["readOnly"],
            false
        );
    }
}
