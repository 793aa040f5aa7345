//! The manifests in deploy/: valid against the Kubernetes schemas
//! (kubernetes-validate, strict), consistent with each other, and asking
//! the ferry binary only for flags it has.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn docs(p: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(p).unwrap();
    text.split("\n---")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_yaml_ng::from_str(d).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

#[test]
fn every_manifest_is_valid_and_consistent() {
    let dir = deploy_dir();
    let files = yaml_files(&dir);
    let manifests: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.file_name().unwrap() != "kustomization.yaml")
        .collect();
    assert!(manifests.len() >= 5, "{files:?}");

    // The Kubernetes schemas, strictly (unknown fields are errors).
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "--no-warn"])
        .args(&manifests)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run kubernetes-validate ({e}): pip install kubernetes-validate (.ci/run does)"
            )
        });
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );

    // Kustomizations name files and directories that exist.
    for k in files
        .iter()
        .filter(|p| p.file_name().unwrap() == "kustomization.yaml")
    {
        let v = &docs(k)[0];
        for r in v["resources"].as_array().unwrap() {
            let target = k.parent().unwrap().join(r.as_str().unwrap());
            assert!(
                target.exists(),
                "{}: {} is missing",
                k.display(),
                target.display()
            );
        }
    }

    let help = |sub: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut workloads = 0;
    for p in &manifests {
        for d in docs(p) {
            let kind = d["kind"].as_str().unwrap_or_default();
            if kind != "DaemonSet" && kind != "StatefulSet" {
                continue;
            }
            workloads += 1;
            let spec = &d["spec"];
            // The selector selects the pods it makes.
            let labels = spec["template"]["metadata"]["labels"].as_object().unwrap();
            for (k, v) in spec["selector"]["matchLabels"].as_object().unwrap() {
                assert_eq!(labels.get(k), Some(v), "{}: selector {k}", p.display());
            }
            let pod = &spec["template"]["spec"];
            let mut volumes: Vec<&str> = pod["volumes"]
                .as_array()
                .map(|v| v.iter().map(|v| v["name"].as_str().unwrap()).collect())
                .unwrap_or_default();
            if let Some(t) = spec["volumeClaimTemplates"].as_array() {
                volumes.extend(t.iter().map(|t| t["metadata"]["name"].as_str().unwrap()));
            }
            for c in pod["containers"].as_array().unwrap() {
                for m in c["volumeMounts"].as_array().unwrap() {
                    let name = m["name"].as_str().unwrap();
                    assert!(
                        volumes.contains(&name),
                        "{}: mount {name} has no volume",
                        p.display()
                    );
                }
                // Every flag is one the binary knows.
                let args: Vec<&str> = c["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap())
                    .collect();
                let text = help(args[0]);
                for a in &args[1..] {
                    let flag = a.split('=').next().unwrap();
                    assert!(
                        text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
                        "{}: `ferry {}` has no {flag}",
                        p.display(),
                        args[0]
                    );
                }
                if kind == "DaemonSet" {
                    let pods = c["volumeMounts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|m| m["mountPath"] == "/var/lib/kubelet/pods")
                        .unwrap_or_else(|| panic!("{}: no kubelet pods mount", p.display()));
                    assert_eq!(
                        pods["mountPropagation"],
                        "HostToContainer",
                        "{}",
                        p.display()
                    );
                    let source = p.parent().unwrap().ends_with("source");
                    assert_eq!(
                        pods["readOnly"].as_bool(),
                        Some(source),
                        "{}: read-only on the source cluster, read-write on the target",
                        p.display()
                    );
                    assert!(args.contains(&"--name=$(NODE_NAME)"), "{}", p.display());
                }
            }
        }
    }
    assert_eq!(workloads, 3, "coordinator, source agents, target agents");
}
