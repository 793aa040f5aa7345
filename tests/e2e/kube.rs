//! Claims to nodes and paths: a fake Kubernetes API (a real HTTP server in
//! the test, serving recorded API objects) for CSI, in-tree and block
//! volumes, a kubelet directory laid out on disk, and real coordinator and
//! agent processes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::common::*;
use crate::fleet::Fleet;

/// Answers GETs from a map of path (with query) to JSON; 404 otherwise.
/// A POST of a pod plays the scheduler and the kubelet: the pod lands on
/// `node`, is Pending at its first read and Running after (except one that
/// mounts claim `stuck`, which never starts); a DELETE removes it.
struct FakeApi {
    url: String,
    objects: Arc<Mutex<BTreeMap<String, serde_json::Value>>>,
    /// Pods created through the API, as they were sent.
    created: Arc<Mutex<Vec<serde_json::Value>>>,
}

type Objects = Arc<Mutex<BTreeMap<String, serde_json::Value>>>;

impl FakeApi {
    fn start(
        objects: BTreeMap<String, serde_json::Value>,
        token: &'static str,
        node: &'static str,
    ) -> Self {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let objects: Objects = Arc::new(Mutex::new(objects));
        let created = Arc::new(Mutex::new(Vec::new()));
        let (objs, made) = (objects.clone(), created.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let mut words = line.split_whitespace();
                let method = words.next().unwrap_or("").to_string();
                let path = words.next().unwrap_or("").to_string();
                let mut authorized = false;
                let mut length = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if lower.starts_with("authorization:")
                        && h.trim_end().ends_with(&format!("Bearer {token}"))
                    {
                        authorized = true;
                    }
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                if r.read_exact(&mut body).is_err() {
                    continue;
                }
                let (status, body) = if !authorized {
                    (
                        "401 Unauthorized",
                        serde_json::json!({"kind": "Status", "message": "Unauthorized"}),
                    )
                } else {
                    let mut o = objs.lock().unwrap();
                    match method.as_str() {
                        "POST" => {
                            let pod: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            made.lock().unwrap().push(pod.clone());
                            ("201 Created", create_pod(&mut o, &path, pod, node))
                        }
                        "PATCH" => {
                            let patch: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            match scale_workload(&mut o, &path, &patch) {
                                Some(v) => ("200 OK", v),
                                None => not_found(),
                            }
                        }
                        "DELETE" => {
                            let at = path.split('?').next().unwrap().to_string();
                            match delete_pod(&mut o, &at) {
                                Some(v) => ("200 OK", v),
                                None => not_found(),
                            }
                        }
                        _ => match o.get(&path).cloned() {
                            Some(v) => {
                                start_pod(&mut o, &path, &v);
                                ("200 OK", v)
                            }
                            None => not_found(),
                        },
                    }
                };
                let body = body.to_string();
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = r.read(&mut [0u8; 0]);
            }
        });
        FakeApi {
            url,
            objects,
            created,
        }
    }

    /// The names of the pods the API lists in namespace `shop`.
    fn pods(&self) -> Vec<String> {
        self.objects.lock().unwrap()["/api/v1/namespaces/shop/pods"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }
}

fn not_found() -> (&'static str, serde_json::Value) {
    (
        "404 Not Found",
        serde_json::json!({"kind": "Status", "message": "not found"}),
    )
}

/// A scale change, as the API server and the workload's controller make
/// it: replicas recorded, and at zero the workload's pods are gone.
fn scale_workload(
    o: &mut BTreeMap<String, serde_json::Value>,
    path: &str,
    patch: &serde_json::Value,
) -> Option<serde_json::Value> {
    let replicas = patch["spec"]["replicas"].clone();
    let v = o.get_mut(path)?;
    v["spec"]["replicas"] = replicas.clone();
    let v = v.clone();
    if replicas == 0 {
        // .../namespaces/NS/statefulsets/NAME/scale
        let parts: Vec<&str> = path.split('/').collect();
        let (ns, name) = (parts[5], parts[7]);
        let list = format!("/api/v1/namespaces/{ns}/pods");
        if let Some(l) = o.get_mut(&list) {
            l["items"].as_array_mut().unwrap().retain(|p| {
                !p["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["name"] == name))
            });
        }
    }
    Some(v)
}

/// A created pod gets a name, a uid and a node, and starts Pending.
fn create_pod(
    o: &mut BTreeMap<String, serde_json::Value>,
    list: &str,
    mut pod: serde_json::Value,
    node: &str,
) -> serde_json::Value {
    let n = o.len();
    let name = format!(
        "{}{n}",
        pod["metadata"]["generateName"].as_str().unwrap_or("pod-")
    );
    let claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
        .as_str()
        .unwrap_or("")
        .to_string();
    pod["metadata"]["name"] = name.clone().into();
    pod["metadata"]["uid"] = format!("uid-helper-{node}-{claim}").into();
    pod["spec"]["nodeName"] = node.into();
    pod["status"] = serde_json::json!({"phase": "Pending"});
    o.insert(format!("{list}/{name}"), pod.clone());
    o.get_mut(list).unwrap()["items"]
        .as_array_mut()
        .unwrap()
        .push(pod.clone());
    pod
}

/// The kubelet starts a pending pod once it has been seen pending (a pod
/// that mounts claim `stuck` never starts).
fn start_pod(o: &mut BTreeMap<String, serde_json::Value>, path: &str, v: &serde_json::Value) {
    let claim = &v["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"];
    if !path.contains("/pods/") || v["status"]["phase"] != "Pending" || claim == "stuck" {
        return;
    }
    let list = path.rsplit_once('/').unwrap().0.to_string();
    o.get_mut(path).unwrap()["status"]["phase"] = "Running".into();
    // A Pending (WaitForFirstConsumer) claim is bound when its first pod
    // starts, to the volume named in its test annotation.
    let ns = path.split('/').nth(4).unwrap_or("");
    let claim_path = format!(
        "/api/v1/namespaces/{ns}/persistentvolumeclaims/{}",
        claim.as_str().unwrap_or("")
    );
    if let Some(c) = o.get_mut(&claim_path)
        && c["status"]["phase"] == "Pending"
    {
        c["spec"]["volumeName"] = c["metadata"]["annotations"]["test/binds-to"].clone();
        c["status"]["phase"] = "Bound".into();
    }
    for p in o.get_mut(&list).unwrap()["items"].as_array_mut().unwrap() {
        if p["metadata"]["name"] == v["metadata"]["name"] {
            p["status"]["phase"] = "Running".into();
        }
    }
}

fn delete_pod(
    o: &mut BTreeMap<String, serde_json::Value>,
    path: &str,
) -> Option<serde_json::Value> {
    let v = o.remove(path)?;
    let list = path.rsplit_once('/').unwrap().0.to_string();
    if let Some(l) = o.get_mut(&list) {
        l["items"]
            .as_array_mut()
            .unwrap()
            .retain(|p| p["metadata"]["name"] != v["metadata"]["name"]);
    }
    Some(v)
}

fn kubeconfig(dir: &Path, name: &str, server: &str, token: &str, ns: &str) -> String {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: ctx\n\
             clusters:\n- name: c\n  cluster:\n    server: {server}\n\
             contexts:\n- name: ctx\n  context:\n    cluster: c\n    user: u\n    namespace: {ns}\n\
             users:\n- name: u\n  user:\n    token: {token}\n"
        ),
    )
    .unwrap();
    p.to_str().unwrap().to_string()
}

fn claim(ns: &str, name: &str, pv: &str, class: &str, size: &str, mode: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "shop"}},
        "spec": {"volumeName": pv, "storageClassName": class, "volumeMode": mode,
                 "resources": {"requests": {"storage": size}}},
        "status": {"phase": if pv.is_empty() { "Pending" } else { "Bound" }, "capacity": {"storage": size}}
    })
}

fn pod(ns: &str, name: &str, uid: &str, node: &str, claims: &[&str]) -> serde_json::Value {
    let volumes: Vec<_> = claims
        .iter()
        .map(|c| serde_json::json!({"name": format!("v-{c}"), "persistentVolumeClaim": {"claimName": c}}))
        .collect();
    serde_json::json!({
        "metadata": {"name": name, "namespace": ns, "uid": uid},
        "spec": {"nodeName": node, "volumes": volumes},
        "status": {"phase": "Running"}
    })
}

/// The source cluster (namespace `shop` on node-a) and the target (namespace
/// `shop` on node-b), each with its API objects.
fn source_api() -> BTreeMap<String, serde_json::Value> {
    let mut m = BTreeMap::new();
    let claims = [
        claim(
            "shop",
            "data-db-0",
            "pvc-111",
            "alicloud-disk-ssd",
            "20Gi",
            "Filesystem",
        ),
        claim("shop", "logs", "pvc-222", "nfs-client", "5Gi", "Filesystem"),
        claim(
            "shop",
            "raw",
            "pvc-333",
            "alicloud-disk-ssd",
            "64Mi",
            "Block",
        ),
        claim(
            "shop",
            "orphan",
            "pvc-444",
            "alicloud-disk-ssd",
            "1Gi",
            "Filesystem",
        ),
    ];
    for c in &claims {
        let name = c["metadata"]["name"].as_str().unwrap();
        m.insert(
            format!("/api/v1/namespaces/shop/persistentvolumeclaims/{name}"),
            c.clone(),
        );
    }
    m.insert(
        "/api/v1/namespaces/shop/persistentvolumeclaims".into(),
        serde_json::json!({"items": claims}),
    );
    m.insert(
        "/api/v1/namespaces/shop/persistentvolumeclaims?labelSelector=app%3Dshop".into(),
        serde_json::json!({"items": claims}),
    );
    m.insert(
        "/api/v1/namespaces/shop/pods".into(),
        serde_json::json!({"items": [
            pod("shop", "db-0", "uid-db", "node-a", &["data-db-0", "logs", "raw"]),
            {"metadata": {"name": "old", "uid": "uid-old"}, "spec": {"nodeName": "node-a",
              "volumes": [{"persistentVolumeClaim": {"claimName": "orphan"}}]},
             "status": {"phase": "Succeeded"}},
        ]}),
    );
    for (pv, spec) in [
        (
            "pvc-111",
            serde_json::json!({"csi": {"driver": "diskplugin.csi.alibabacloud.com", "volumeHandle": "d-1"}}),
        ),
        (
            "pvc-222",
            serde_json::json!({"nfs": {"server": "10.0.0.5", "path": "/exports/logs"}}),
        ),
        (
            "pvc-333",
            serde_json::json!({"csi": {"driver": "diskplugin.csi.alibabacloud.com", "volumeHandle": "d-3"}}),
        ),
        (
            "pvc-444",
            serde_json::json!({"csi": {"driver": "diskplugin.csi.alibabacloud.com", "volumeHandle": "d-4"}}),
        ),
    ] {
        m.insert(
            format!("/api/v1/persistentvolumes/{pv}"),
            serde_json::json!({"metadata": {"name": pv}, "spec": spec}),
        );
    }
    m
}

fn target_api() -> BTreeMap<String, serde_json::Value> {
    let mut m = BTreeMap::new();
    m.insert(
        "/api/v1/namespaces/shop/persistentvolumeclaims/data-db-0".into(),
        claim(
            "shop",
            "data-db-0",
            "pvc-999",
            "csi-disk-ssd",
            "20Gi",
            "Filesystem",
        ),
    );
    m.insert(
        "/api/v1/namespaces/shop/pods".into(),
        serde_json::json!({"items": [pod("shop", "db-0", "uid-new", "node-b", &["data-db-0"])]}),
    );
    m.insert(
        "/api/v1/persistentvolumes/pvc-999".into(),
        serde_json::json!({"spec": {"csi": {"driver": "disk.csi.everest.io"}}}),
    );
    // Claims no pod mounts yet: one a helper pod can mount, one whose
    // helper never starts.
    // `fresh` is Pending (WaitForFirstConsumer) until its first pod starts.
    for (name, pv) in [("fresh", "pvc-998"), ("stuck", "pvc-997")] {
        let c = if name == "fresh" {
            let mut c = claim("shop", name, "", "csi-disk-ssd", "1Gi", "Filesystem");
            c["metadata"]["annotations"] = serde_json::json!({"test/binds-to": pv});
            c
        } else {
            claim("shop", name, pv, "csi-disk-ssd", "1Gi", "Filesystem")
        };
        m.insert(
            format!("/api/v1/namespaces/shop/persistentvolumeclaims/{name}"),
            c,
        );
        m.insert(
            format!("/api/v1/persistentvolumes/{pv}"),
            serde_json::json!({"spec": {"csi": {"driver": "disk.csi.everest.io"}}}),
        );
    }
    m
}

#[test]
fn claims_resolve_to_their_node_and_kubelet_path_and_move_between_clusters() {
    let mut f = Fleet::start();
    let src_api = FakeApi::start(source_api(), "src-token", "node-a");
    let dst_api = FakeApi::start(target_api(), "dst-token", "node-b");
    let dir = f.env.path("k");
    std::fs::create_dir_all(&dir).unwrap();
    let src_kc = kubeconfig(&dir, "src", &src_api.url, "src-token", "shop");
    let dst_kc = kubeconfig(&dir, "dst", &dst_api.url, "dst-token", "shop");
    let bad_kc = kubeconfig(&dir, "bad", &src_api.url, "wrong", "shop");

    // The source node's kubelet directory: a CSI volume, an in-tree NFS
    // volume and a block device (an image file here).
    let kubelet_a = f.env.path("node-a/kubelet");
    let pod_a = kubelet_a.join("pods/uid-db");
    let csi = pod_a.join("volumes/kubernetes.io~csi/pvc-111/mount");
    make_tree(&csi);
    let nfs = pod_a.join("volumes/kubernetes.io~nfs/pvc-222");
    std::fs::create_dir_all(&nfs).unwrap();
    std::fs::write(nfs.join("app.log"), noise(70_000, 3)).unwrap();
    // As the kubelet lays out a CSI block volume: the pod's entry links
    // to the device published under plugins/ (an image file here).
    let dev = pod_a.join("volumeDevices/kubernetes.io~csi");
    std::fs::create_dir_all(&dev).unwrap();
    let published = kubelet_a.join("plugins/kubernetes.io/csi/volumeDevices/publish/pvc-333");
    std::fs::create_dir_all(&published).unwrap();
    std::fs::write(published.join("uid-db"), noise(1 << 20, 4)).unwrap();
    std::os::unix::fs::symlink(published.join("uid-db"), dev.join("pvc-333")).unwrap();
    let kubelet_b = f.env.path("node-b/kubelet");
    std::fs::create_dir_all(kubelet_b.join("pods/uid-new/volumes/kubernetes.io~csi/pvc-999/mount"))
        .unwrap();
    // Roots as the DaemonSet gives them: the pod and plugin directories.
    let plugins_a = kubelet_a.join("plugins");
    f.start_agent_with(
        "node-a",
        &kubelet_a.join("pods"),
        &["--root", plugins_a.to_str().unwrap()],
    );
    f.start_agent("node-b", &kubelet_b);
    let ka = kubelet_a.to_str().unwrap().to_string();
    let kb = kubelet_b.to_str().unwrap().to_string();

    // The plan: every claim, its size, class, target class and node.
    let plan = f.json(&[
        "plan",
        "--kubeconfig",
        &src_kc,
        "-l",
        "app=shop",
        "--storage-class-map",
        "alicloud-disk-ssd=csi-disk-ssd",
    ]);
    let claims = plan["claims"].as_array().unwrap();
    assert_eq!(claims.len(), 4, "{plan}");
    let db = claims.iter().find(|c| c["claim"] == "data-db-0").unwrap();
    assert_eq!(db["size_bytes"], 20u64 << 30, "{db}");
    assert_eq!(db["target_storage_class"], "csi-disk-ssd", "{db}");
    assert_eq!(db["node"], "node-a", "{db}");
    let logs = claims.iter().find(|c| c["claim"] == "logs").unwrap();
    assert_eq!(
        logs["target_storage_class"], "nfs-client",
        "unmapped: {logs}"
    );
    let orphan = claims.iter().find(|c| c["claim"] == "orphan").unwrap();
    assert!(orphan["node"].is_null(), "{orphan}");
    assert_eq!(
        plan["total_bytes"],
        (20u64 << 30) + (5 << 30) + (64 << 20) + (1 << 30)
    );

    // Snapshots by claim go to node-a's agent and find the data.
    let snap = |claim: &str, volume: &str| {
        f.json(&[
            "snapshot",
            &format!("pvc:shop/{claim}"),
            "--volume",
            volume,
            "--kubeconfig",
            &src_kc,
            "--kubelet-dir",
            &ka,
            "--wait",
        ])
    };
    let s = snap("data-db-0", "db");
    assert_eq!(s["agent"], "node-a", "{s}");
    assert!(s["files"].as_u64().unwrap() > 3, "{s}");
    let s = snap("logs", "logs");
    assert_eq!(s["bytes_scanned"], 70_000, "in-tree NFS: {s}");
    let s = snap("raw", "raw");
    assert_eq!(s["bytes_scanned"], 1 << 20, "block: {s}");

    // Restored by claim on the target cluster, on node-b.
    let r = f.json(&[
        "restore",
        "db",
        "pvc:shop/data-db-0",
        "--kubeconfig",
        &dst_kc,
        "--kubelet-dir",
        &kb,
        "--wait",
    ]);
    assert_eq!(r["agent"], "node-b", "{r}");
    assert_same_tree(
        &csi,
        &kubelet_b.join("pods/uid-new/volumes/kubernetes.io~csi/pvc-999/mount"),
    );

    // --mount-helper: a pod mounting the orphan claim read-only starts on
    // node-a, the snapshot reads the volume through it (followed to its end
    // without --wait: the pod must outlive the job), and it is deleted.
    let orphan_dir =
        kubelet_a.join("pods/uid-helper-node-a-orphan/volumes/kubernetes.io~csi/pvc-444/mount");
    make_tree(&orphan_dir);
    let s = f.json(&[
        "snapshot",
        "pvc:shop/orphan",
        "--volume",
        "orphan",
        "--kubeconfig",
        &src_kc,
        "--kubelet-dir",
        &ka,
        "--mount-helper",
    ]);
    assert_eq!(s["agent"], "node-a", "{s}");
    assert!(s["files"].as_u64().unwrap() > 3, "{s}");
    let made = src_api.created.lock().unwrap().clone();
    assert_eq!(made.len(), 1, "one helper pod");
    assert_eq!(
        made[0]["spec"]["volumes"][0]["persistentVolumeClaim"],
        serde_json::json!({"claimName": "orphan", "readOnly": true}),
        "{}",
        made[0]
    );
    assert!(
        !src_api.pods().iter().any(|p| p.starts_with("ferry-mount-")),
        "helper deleted: {:?}",
        src_api.pods()
    );
    // A Pending claim (WaitForFirstConsumer) needs a first pod: said so.
    let out = f.run(&[
        "restore",
        "orphan",
        "pvc:shop/fresh",
        "--kubeconfig",
        &dst_kc,
        "--kubelet-dir",
        &kb,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("claim shop/fresh is Pending") && err.contains("--mount-helper"),
        "{err}"
    );
    // And restored into it, read-write: the helper pod binds it.
    let fresh =
        kubelet_b.join("pods/uid-helper-node-b-fresh/volumes/kubernetes.io~csi/pvc-998/mount");
    std::fs::create_dir_all(&fresh).unwrap();
    let r = f.json(&[
        "restore",
        "orphan",
        "pvc:shop/fresh",
        "--kubeconfig",
        &dst_kc,
        "--kubelet-dir",
        &kb,
        "--mount-helper",
    ]);
    assert_eq!(r["agent"], "node-b", "{r}");
    assert_same_tree(&orphan_dir, &fresh);
    let made = dst_api.created.lock().unwrap().clone();
    assert_eq!(
        made[0]["spec"]["volumes"][0]["persistentVolumeClaim"]["readOnly"],
        false
    );
    assert!(!dst_api.pods().iter().any(|p| p.starts_with("ferry-mount-")));

    // Clear refusals: no pod mounts it; no such claim; bad token; no agent
    // on the node; no coordinator; a malformed claim name.
    let fail = |args: &[&str], want: &str| {
        let out = f.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    };
    let snap_args = |claim: &'static str, kc: &str| -> Vec<String> {
        [
            "snapshot",
            claim,
            "--volume",
            "x",
            "--kubeconfig",
            kc,
            "--kubelet-dir",
            &ka,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let v = snap_args("pvc:shop/orphan", &src_kc);
    fail(
        &v.iter().map(String::as_str).collect::<Vec<_>>(),
        "no running pod mounts claim shop/orphan: pass --mount-helper",
    );
    // A helper pod that never starts: refused after the timeout, deleted.
    fail(
        &[
            "restore",
            "orphan",
            "pvc:shop/stuck",
            "--kubeconfig",
            &dst_kc,
            "--kubelet-dir",
            &kb,
            "--mount-helper",
            "--helper-timeout",
            "1",
        ],
        "is not running after 1s",
    );
    assert!(!dst_api.pods().iter().any(|p| p.starts_with("ferry-mount-")));
    let v = snap_args("pvc:shop/nope", &src_kc);
    fail(
        &v.iter().map(String::as_str).collect::<Vec<_>>(),
        "no claim nope in namespace shop",
    );
    let v = snap_args("pvc:shop/data-db-0", &bad_kc);
    fail(
        &v.iter().map(String::as_str).collect::<Vec<_>>(),
        "Unauthorized",
    );
    let v = snap_args("pvc:shop", &src_kc);
    fail(
        &v.iter().map(String::as_str).collect::<Vec<_>>(),
        "pvc:NAMESPACE/CLAIM",
    );
    f.agent_mut("node-a").kill9();
    let out = f.env.run(&[
        "snapshot",
        "pvc:shop/data-db-0",
        "--volume",
        "x",
        "--kubeconfig",
        &src_kc,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--coordinator"), "{}", stderr(&out));
}

/// The source cluster of a migration: a StatefulSet's pod on node-a
/// mounts claim `data-db-0`; the target has the same StatefulSet scaled to
/// zero and a bound claim no pod mounts yet.
fn migration_apis() -> (
    BTreeMap<String, serde_json::Value>,
    BTreeMap<String, serde_json::Value>,
) {
    let owned = |mut p: serde_json::Value| {
        p["metadata"]["ownerReferences"] =
            serde_json::json!([{"kind": "StatefulSet", "name": "db", "controller": true}]);
        p
    };
    let scale = |n: i64| serde_json::json!({"kind": "Scale", "spec": {"replicas": n}});
    let mut src = BTreeMap::new();
    src.insert(
        "/api/v1/namespaces/shop/persistentvolumeclaims/data-db-0".into(),
        claim(
            "shop",
            "data-db-0",
            "pvc-111",
            "alicloud-disk-ssd",
            "1Gi",
            "Filesystem",
        ),
    );
    src.insert(
        "/api/v1/persistentvolumes/pvc-111".into(),
        serde_json::json!({"spec": {"csi": {"driver": "diskplugin.csi.alibabacloud.com"}}}),
    );
    src.insert(
        "/api/v1/namespaces/shop/pods".into(),
        serde_json::json!({"items": [owned(pod("shop", "db-0", "uid-db", "node-a", &["data-db-0"]))]}),
    );
    src.insert(
        "/apis/apps/v1/namespaces/shop/statefulsets/db/scale".into(),
        scale(1),
    );
    let mut dst = BTreeMap::new();
    dst.insert(
        "/api/v1/namespaces/shop/persistentvolumeclaims/data-db-0".into(),
        claim(
            "shop",
            "data-db-0",
            "pvc-999",
            "csi-disk-ssd",
            "1Gi",
            "Filesystem",
        ),
    );
    dst.insert(
        "/api/v1/persistentvolumes/pvc-999".into(),
        serde_json::json!({"spec": {"csi": {"driver": "disk.csi.everest.io"}}}),
    );
    dst.insert(
        "/api/v1/namespaces/shop/pods".into(),
        serde_json::json!({"items": []}),
    );
    dst.insert(
        "/apis/apps/v1/namespaces/shop/statefulsets/db/scale".into(),
        scale(0),
    );
    (src, dst)
}

#[test]
fn a_migration_of_claims_over_agents_quiesces_the_workload_and_reports() {
    let mut f = Fleet::start();
    let (src, dst) = migration_apis();
    let src_api = FakeApi::start(src, "src-token", "node-a");
    let dst_api = FakeApi::start(dst, "dst-token", "node-b");
    let dir = f.env.path("k");
    std::fs::create_dir_all(&dir).unwrap();
    let src_kc = kubeconfig(&dir, "src", &src_api.url, "src-token", "shop");
    let dst_kc = kubeconfig(&dir, "dst", &dst_api.url, "dst-token", "shop");
    // One kubelet directory layout for both nodes (pod uids differ).
    let kubelet = f.env.path("kubelet");
    let db = kubelet.join("pods/uid-db/volumes/kubernetes.io~csi/pvc-111/mount");
    make_tree(&db);
    // Where the kubelet mounts the same volumes for ferry's helper pods:
    // the source volume again, and the target's claim.
    let helper_src =
        kubelet.join("pods/uid-helper-node-a-data-db-0/volumes/kubernetes.io~csi/pvc-111");
    std::fs::create_dir_all(&helper_src).unwrap();
    std::os::unix::fs::symlink(&db, helper_src.join("mount")).unwrap();
    let target =
        kubelet.join("pods/uid-helper-node-b-data-db-0/volumes/kubernetes.io~csi/pvc-999/mount");
    std::fs::create_dir_all(&target).unwrap();
    // A plain directory pair beside it.
    let (dir_a, dir_b) = (f.env.path("node-a/data"), f.env.path("node-b/data"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(dir_b.parent().unwrap()).unwrap();
    std::fs::write(dir_a.join("config.yaml"), b"replicas: 3\n").unwrap();
    std::fs::write(dir_a.join("blob"), noise(600_000, 8)).unwrap();
    // And a bucket prefix between two clouds, through the vault; each
    // agent reaches the clouds with its own remotes.
    let (cloud_a, cloud_b, remotes) = two_clouds(&f.env.path("clouds"));
    let (ca, cb) = (
        crate::bucket::client(&cloud_a),
        crate::bucket::client(&cloud_b),
    );
    for i in 0..5 {
        crate::bucket::put(
            &ca,
            "src-bucket",
            &format!("assets/{i}.js"),
            noise(10_000 + i, i as u64),
            Some("text/javascript"),
            &[],
        );
    }
    let pods = kubelet.join("pods");
    for (name, d) in [("node-a", &dir_a), ("node-b", &dir_b)] {
        let parent = d.parent().unwrap().to_str().unwrap().to_string();
        f.start_agent_with(name, &pods, &["--root", &parent, "--config", &remotes]);
    }
    let k = kubelet.to_str().unwrap().to_string();
    let cluster = [
        "--source-kubeconfig",
        src_kc.as_str(),
        "--target-kubeconfig",
        dst_kc.as_str(),
        "--kubelet-dir",
        k.as_str(),
        "--mount-helper",
    ];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(cluster.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>| f.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let json = |args: Vec<String>| f.json(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let created = f.json(&[
        "migration",
        "create",
        "shop",
        "--from",
        "pvc:shop/data-db-0",
        "--to",
        "pvc:shop/data-db-0",
        "--from",
        dir_a.to_str().unwrap(),
        "--to",
        dir_b.to_str().unwrap(),
        "--from",
        "cloud-a:src-bucket/assets",
        "--to",
        "cloud-b:dst-bucket/assets",
        "--from-agent",
        "node-a",
        "--to-agent",
        "node-b",
    ]);
    assert_eq!(created["pairs"][0]["kind"], "claim", "{created}");
    assert_eq!(created["pairs"][1]["kind"], "dir", "{created}");
    assert_eq!(created["pairs"][2]["kind"], "bucket", "{created}");

    // Two rounds, the data changing between them.
    let r = json(with(&["migration", "presync", "shop"]));
    assert_eq!(r["rounds"][0]["ok"], true, "{r}");
    assert_same_tree(&db, &target);
    std::fs::write(db.join("a/b/text.log"), "new line\n".repeat(1000)).unwrap();
    let r = json(with(&["migration", "presync", "shop"]));
    assert_eq!(r["rounds"][0]["ok"], true, "{r}");
    let p0 = &r["rounds"][0]["pairs"][0];
    assert_eq!(p0["bytes_written"], 9000, "only the change: {p0}");
    assert_eq!(r["estimate"]["parallel"], true, "{r}");
    assert!(r["estimate"]["downtime_s"].is_number(), "{r}");

    // The cutover: the StatefulSet scaled to zero (its pod goes), the
    // final delta through helper pods, verified, the target scaled up.
    std::fs::write(db.join("last-write"), b"before the cutover").unwrap();
    let c = json(with(&[
        "migration",
        "cutover",
        "shop",
        "--quiesce",
        "--resume",
        "--verify",
    ]));
    assert_eq!(c["ok"], true, "{c}");
    let steps: Vec<_> = c["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        steps,
        [
            "quiesce workloads",
            "final delta",
            "verify",
            "resume workloads"
        ],
        "{c}"
    );
    assert!(
        c["steps"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("statefulset/db shop (was 1)"),
        "{c}"
    );
    let replicas = |api: &FakeApi| {
        api.objects.lock().unwrap()["/apis/apps/v1/namespaces/shop/statefulsets/db/scale"]["spec"]
            ["replicas"]
            .clone()
    };
    assert_eq!(replicas(&src_api), 0, "the source stays quiesced");
    assert_eq!(
        replicas(&dst_api),
        1,
        "the target runs the source's replicas"
    );
    assert_same_tree(&db, &target);
    assert_same_tree(&dir_a, &dir_b);
    let (a, b) = (
        crate::bucket::read_all(&ca, "src-bucket", "assets/"),
        crate::bucket::read_all(&cb, "dst-bucket", "assets/"),
    );
    assert_eq!(a.len(), 5);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(
        a.iter()
            .all(|(k, o)| o.body == b[k].body && o.content_type == b[k].content_type)
    );
    for api in [&src_api, &dst_api] {
        assert!(
            !api.pods().iter().any(|p| p.starts_with("ferry-mount-")),
            "helper pods deleted: {:?}",
            api.pods()
        );
    }

    // The report, compared on the target's agent and signed by the
    // coordinator (which holds the vault's key).
    let report = f.env.path("report.json");
    let out = run(with(&[
        "migration",
        "report",
        "shop",
        "--json",
        "-o",
        report.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(doc["ok"], true, "{doc}");
    assert!(
        doc["vault"].as_str().is_some_and(|v| v.len() == 32),
        "{doc}"
    );
    let entries = doc["pairs"][0]["entries"].as_array().unwrap();
    assert!(entries.iter().any(|e| e["path"] == "/last-write"), "{doc}");
    assert!(entries.iter().all(|e| e["source"] == e["target"]), "{doc}");
    assert_eq!(doc["pairs"][2]["files"], 5, "{doc}");
    assert_eq!(doc["pairs"][2]["ok"], true, "{doc}");
    let out = f.run(&["migration", "verify-report", report.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut forged = doc.clone();
    forged["ok"] = false.into();
    let forged_file = f.env.path("forged.json");
    std::fs::write(&forged_file, forged.to_string()).unwrap();
    let out = f.run(&["migration", "verify-report", forged_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not match"), "{}", stderr(&out));

    // A pod that no controller owns cannot be quiesced by ferry: refused
    // before anything is copied, with what to do.
    src_api
        .objects
        .lock()
        .unwrap()
        .get_mut("/api/v1/namespaces/shop/pods")
        .unwrap()["items"] =
        serde_json::json!([pod("shop", "bare", "uid-bare", "node-a", &["data-db-0"])]);
    let out = run(with(&["migration", "cutover", "shop", "--quiesce"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("belongs to no Deployment or StatefulSet"),
        "{}",
        stderr(&out)
    );
}
