//! Issue 14, on the real cluster: Status says, for each running target pod,
//! whether its agent carries the environment's keyed requests, and why not:
//! another previewd instance's agent holds the pod, or agents cannot start
//! there. Start warns about both.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::e2e::*;
use common::{Previewd, TestNs, echo_app, eventually, ready_pods, start_req};
use preview::proto::{self, AgentState};

type Client = preview::cli::Client;

/// Waits until `key`'s environment shows one agent in `state`; returns it.
async fn agent_in(c: &Client, key: &str, state: AgentState, within: Duration) -> Result<proto::Agent> {
    eventually(&format!("{key}'s agent to be {state:?}"), within, || async {
        let req = proto::StatusRequest { key: key.into(), ..Default::default() };
        let snap = c.clone().status(req).await?.into_inner().message().await?.context("no snapshot")?;
        let env = snap.environments.into_iter().find(|e| e.key == key).context("no environment")?;
        Ok(env.agents.into_iter().find(|a| a.state == state as i32))
    })
    .await
}

fn clean(key: &str) -> proto::CleanRequest {
    proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key(key.into())) }
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn another_instances_agent_shows_in_status_and_start_warns() -> Result<()> {
    let ns = TestNs::new("ag-foreign").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    ready_pods(&ns, "app=orders", 1).await?;
    let ip = cluster_ip(&ns, "orders").await?;
    let a = previewd(&ns).await?;
    let ca = a.client().await?;
    ca.clone().start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "fa")).await?;
    until(&ip, Some("fa"), &["v2"], Duration::from_secs(60)).await?;
    let routing = agent_in(&ca, "fa", AgentState::Routing, Duration::from_secs(10)).await?;
    ensure!(routing.target == "deployment/orders" && routing.reason.is_empty(), "{routing:?}");

    // A second previewd (another instance) previews the same target: the
    // pod already carries the first one's agent.
    let data = std::env::temp_dir().join(format!("previewd-{}-b", ns.name));
    let b = Previewd::start_full(&ns, data, format!("{}-b", ns.name), "198.18.255.254:0", |a| {
        a.agent_image = Some(AGENT_IMAGE.into());
    })
    .await?;
    let cb = b.client().await?;
    let started =
        cb.clone().start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "fb")).await?.into_inner();
    eprintln!("Start warnings: {:?}", started.warnings);
    ensure!(
        started.warnings.iter().any(|w| w.contains("another previewd's agent") && w.contains(&a.addr)),
        "no warning: {:?}",
        started.warnings
    );
    let foreign = agent_in(&cb, "fb", AgentState::Foreign, Duration::from_secs(30)).await?;
    ensure!(foreign.reason.contains(&a.addr), "{foreign:?}");
    // Status tells the truth: fb's keyed requests stay on staging.
    ensure!(call(&ip, Some("fb")).await? == chain(&["v1"]));
    ensure!(call(&ip, Some("fa")).await? == chain(&["v2"]));
    cb.clone().clean(clean("fb")).await?;
    ca.clone().clean(clean("fa")).await?;
    b.stop().await?;
    a.stop().await
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn agents_that_cannot_start_show_as_failed_with_their_error() -> Result<()> {
    let ns = TestNs::new("ag-failed").await?;
    // The app holds the agent's port: every agent fails to bind.
    echo_app(&ns, "orders", "v1", 1, &[("ECHO_LISTEN", "0.0.0.0:8080,0.0.0.0:15001")]).await?;
    ready_pods(&ns, "app=orders", 1).await?;
    let d = previewd(&ns).await?;
    let c = d.client().await?;
    c.clone().start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "fail1")).await?;
    let failed = agent_in(&c, "fail1", AgentState::Failed, Duration::from_secs(120)).await?;
    eprintln!("failed agent: {failed:?}");
    ensure!(failed.reason.contains("3 agents in a row failed"), "{failed:?}");
    ensure!(failed.reason.contains("15001"), "the agent's own error is not quoted: {failed:?}");
    // Staging is untouched by the failures.
    let ip = cluster_ip(&ns, "orders").await?;
    ensure!(call(&ip, Some("fail1")).await? == chain(&["v1"]));
    ensure!(call(&ip, None).await? == chain(&["v1"]));
    c.clone().clean(clean("fail1")).await?;
    d.stop().await
}
