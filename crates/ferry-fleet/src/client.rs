//! What the CLI does with a coordinator: submit jobs, follow them, list
//! agents and jobs. Calls retry while the coordinator restarts.

use std::time::Duration;

use crate::conn::{Client, ConnectOptions, with_retry};
use crate::proto;
use crate::spec::{JobProgress, JobSpec};
use crate::{Error, Result};

pub struct FleetClient {
    client: Client,
    url: String,
    /// How long `wait` follows a job through coordinator outages.
    patience: Duration,
}

/// One-shot calls (list, show) fail fast when the coordinator is down.
const QUICK: Duration = Duration::from_secs(5);

impl FleetClient {
    pub fn connect(opts: &ConnectOptions, patience: Duration) -> Result<Self> {
        Ok(Self {
            client: crate::conn::connect(opts)?,
            url: opts.url.clone(),
            patience,
        })
    }

    pub async fn submit(&self, agent: &str, spec: &JobSpec) -> Result<proto::JobInfo> {
        let req = proto::SubmitRequest {
            agent: agent.into(),
            kind: spec.kind().into(),
            spec_json: serde_json::to_string(spec).map_err(|e| Error::Invalid(e.to_string()))?,
        };
        // Not retried blindly: a lost reply would queue the job twice.
        let mut c = self.client.clone();
        c.submit(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| Error::Rpc {
                url: self.url.clone(),
                call: "Submit",
                message: crate::status_line(&s),
            })
    }

    pub async fn job(&self, id: u64) -> Result<proto::JobInfo> {
        self.job_within(id, QUICK).await
    }

    async fn job_within(&self, id: u64, patience: Duration) -> Result<proto::JobInfo> {
        self.job_waiting(id, patience, 0).await
    }

    /// The job, once it ended or after `wait_ms`, whichever comes first.
    async fn job_waiting(
        &self,
        id: u64,
        patience: Duration,
        wait_ms: u32,
    ) -> Result<proto::JobInfo> {
        let c = self.client.clone();
        with_retry(&self.url, "GetJob", patience, || {
            let mut c = c.clone();
            async move { c.get_job(proto::JobRef { id, wait_ms }).await }
        })
        .await
    }

    /// Follows a job until it ends, calling `on_progress` as it moves.
    pub async fn wait(
        &self,
        id: u64,
        mut on_progress: impl FnMut(&JobProgress),
    ) -> Result<proto::JobInfo> {
        loop {
            // The coordinator answers when the job ends, or after a quarter
            // second with its progress.
            let asked = tokio::time::Instant::now();
            let j = self.job_waiting(id, self.patience, 250).await?;
            if j.state == "done" || j.state == "failed" {
                return Ok(j);
            }
            if let Ok(p) = serde_json::from_str::<JobProgress>(&j.progress_json) {
                on_progress(&p);
            }
            // A coordinator that does not wait (an older one) is not
            // asked more than four times a second.
            tokio::time::sleep_until(asked + Duration::from_millis(250)).await;
        }
    }

    /// Queues a distributed job's failed tasks again.
    pub async fn rerun(&self, id: u64) -> Result<proto::JobInfo> {
        let c = self.client.clone();
        with_retry(&self.url, "Rerun", QUICK, || {
            let mut c = c.clone();
            async move { c.rerun(proto::JobRef { id, wait_ms: 0 }).await }
        })
        .await
    }

    /// A distributed job's tasks, totals and (at most `limit`) failed keys.
    pub async fn report(&self, id: u64, limit: u32) -> Result<proto::ReportReply> {
        let c = self.client.clone();
        with_retry(&self.url, "Report", QUICK, || {
            let mut c = c.clone();
            async move { c.report(proto::ReportRequest { id, limit }).await }
        })
        .await
    }

    /// The coordinator signs a migration report with the vault's key (and
    /// names the vault in it).
    pub async fn sign_report(&self, doc: &serde_json::Value) -> Result<serde_json::Value> {
        let (c, json) = (self.client.clone(), doc.to_string());
        let r = with_retry(&self.url, "SignReport", QUICK, || {
            let (mut c, json) = (c.clone(), json.clone());
            async move { c.sign_report(proto::ReportDoc { json }).await }
        })
        .await?;
        serde_json::from_str(&r.json).map_err(|e| Error::Invalid(format!("signed report: {e}")))
    }

    /// Checks a report's signature with the vault's key: Err(reason) when
    /// it does not hold.
    pub async fn verify_report(
        &self,
        doc: &serde_json::Value,
    ) -> Result<std::result::Result<(), String>> {
        let (c, json) = (self.client.clone(), doc.to_string());
        let r = with_retry(&self.url, "VerifyReport", QUICK, || {
            let (mut c, json) = (c.clone(), json.clone());
            async move { c.verify_report(proto::ReportDoc { json }).await }
        })
        .await?;
        Ok(if r.valid { Ok(()) } else { Err(r.error) })
    }

    pub async fn jobs(&self) -> Result<Vec<proto::JobInfo>> {
        let c = self.client.clone();
        let r = with_retry(&self.url, "ListJobs", QUICK, || {
            let mut c = c.clone();
            async move { c.list_jobs(proto::Empty {}).await }
        })
        .await?;
        Ok(r.jobs)
    }

    pub async fn agents(&self) -> Result<Vec<proto::AgentInfo>> {
        let c = self.client.clone();
        let r = with_retry(&self.url, "ListAgents", QUICK, || {
            let mut c = c.clone();
            async move { c.list_agents(proto::Empty {}).await }
        })
        .await?;
        Ok(r.agents)
    }
}
