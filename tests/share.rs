//! Share links (issue 18) on the real cluster, opened in a real Chromium:
//! the demo's chain (frontend → orders → payments, v1) with a preview of
//! orders (v2) whose config asks for a link to frontend. preview-gateway
//! runs as the Deployment in deploy/previewd/gateway.yaml (its ServiceAccount
//! token, RBAC on previewenvironments/shares, previewd's CA), reached on its
//! NodePort as `*.preview.test`. The page through the link shows orders v2
//! by fetch and over a WebSocket; through staging's address, v1. Redirects
//! and cookies stay on the share host. A revoked link, one whose own TTL ran
//! out, and the link after
//! Clean, show the "preview has ended" page (410); an unknown one 404.
//! Refusals: a missing Service, a bad port, a targetless environment with
//! no Service, a caller without the `share` verb.
//!
//! The screenshots go to $PREVIEW_SCREENSHOTS (`make screenshots` points it
//! at docs/screenshots), else to a temporary directory.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::e2e::*;
use common::gateway::{NODE, ShareGateway, status_of};
use common::*;
use preview::proto;
use serde_json::{Value, json};

/// Opens `pages` in headless Chromium (tests/browser/share.cjs).
async fn browser(pages: Value) -> Result<Vec<Value>> {
    let cache = std::env::var("PREVIEW_CACHE").unwrap_or_else(|_| "/var/cache/preview-env".into());
    let spec = json!({"resolve": format!("*.preview.test={NODE}"), "pages": pages});
    let out = tokio::process::Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/share.cjs"))
        .arg(spec.to_string())
        .env("PLAYWRIGHT_CORE", format!("{cache}/tools/node/node_modules/playwright-core"))
        .output()
        .await
        .context("running node (is it installed?)")?;
    ensure!(out.status.success(), "the browser run failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn screenshot(name: &str) -> Result<String> {
    let dir = std::env::var("PREVIEW_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("preview-screenshots"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(name).to_string_lossy().into_owned())
}

fn share(key: &str) -> proto::ShareRequest {
    proto::ShareRequest { key: key.into(), ..Default::default() }
}

fn refused<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<(tonic::Code, String)> {
    match r {
        Ok(v) => anyhow::bail!("expected a refusal, got {v:?}"),
        Err(s) => Ok((s.code(), s.message().to_string())),
    }
}

#[tokio::test]
#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster and Chromium (make test)")]
async fn share_links_open_the_preview_in_a_real_browser() -> Result<()> {
    let ns = TestNs::new("share").await?;
    demo_chain(&ns, false).await?;
    // The gateway's Service first: its NodePort is part of the share domain.
    let gw = ShareGateway::service(&ns).await?;
    let (port, domain) = (gw.port, gw.domain());
    let p = previewd_with(&ns, |a| a.share_domain = domain.clone()).await?;
    gw.start(&ns, &p.addr).await?;
    let mut c = p.client().await?;

    // The demo's preview of orders; its config asks for a link to frontend.
    let frontend = cluster_ip(&ns, "frontend").await?;
    let staging = format!("http://{frontend}:8080/");
    let cfg = config(
        "deployment/orders",
        json!({"feature": {"preview": {"share": {"service": "frontend", "staging_url": staging}}}}),
    );
    let started = c.start(start_req(&cfg, V2, "demo")).await?.into_inner();
    ensure!(started.warnings.is_empty(), "{:?}", started.warnings);
    let env = started.environment.context("environment")?;
    ensure!(env.shares.len() == 1, "Start made no link: {env:?}");
    let link = env.shares[0].url.clone();
    ensure!(link.starts_with("http://") && link.ends_with(&format!(".{domain}/")), "{link}");
    let slug = &env.shares[0].slug;
    ensure!(slug.len() >= 16 && !slug.contains("demo"), "a slug carries ≥ 64 random bits, not the key: {slug}");
    until(&frontend, Some("demo"), &["v1", "v2", "v1"], Duration::from_secs(90)).await?;
    eventually("the gateway to know the link", Duration::from_secs(30), || async {
        Ok((status_of(port, &link).await? == 200).then_some(()))
    })
    .await?;

    // In the browser: the link shows orders v2, by fetch and over the
    // WebSocket; staging's address shows v1; /login's redirect and cookie
    // stay on the share host.
    let got = browser(json!([
        {"url": link, "expect": "chain", "screenshot": screenshot("share-link-v2.png")?},
        {"url": staging, "expect": "chain", "screenshot": screenshot("staging-v1.png")?},
        {"url": link, "expect": "login"},
    ]))
    .await?;
    let (via_link, via_staging, login) = (&got[0], &got[1], &got[2]);
    ensure!(via_link["status"] == 200 && via_link["error"].is_null(), "{via_link}");
    ensure!(via_link["fetch"] == "v1,v2,v1", "fetch through the link: {via_link}");
    ensure!(via_link["ws"] == "v1,v2,v1", "WebSocket through the link: {via_link}");
    ensure!(via_staging["fetch"] == "v1,v1,v1" && via_staging["ws"] == "v1,v1,v1", "staging: {via_staging}");
    ensure!(login["landed"] == format!("{link}welcome"), "the redirect left the share host: {login}");
    ensure!(login["cookies"] == json!(["session=v1"]), "the cookie was not kept for the share host: {login}");

    // Status shows the link.
    let mut st = c.status(proto::StatusRequest { key: "demo".into(), ..Default::default() }).await?.into_inner();
    let snap = st.message().await?.context("snapshot")?;
    ensure!(snap.environments.first().is_some_and(|e| e.shares.iter().any(|l| l.url == link)), "{snap:?}");

    // Refusals, and nothing half-made by them.
    let (code, msg) = refused(c.share(proto::ShareRequest { service: "nope".into(), ..share("demo") }).await)?;
    ensure!(code == tonic::Code::NotFound && msg.starts_with("service: "), "{code:?}: {msg}");
    let (code, msg) =
        refused(c.share(proto::ShareRequest { service: "frontend".into(), port: 81, ..share("demo") }).await)?;
    ensure!(code == tonic::Code::InvalidArgument && msg.starts_with("port: "), "{code:?}: {msg}");
    c.start(start_req(&json!({"target": "targetless"}).to_string(), V2, "solo")).await?;
    let (code, msg) = refused(c.share(share("solo")).await)?;
    ensure!(code == tonic::Code::InvalidArgument && msg.starts_with("service: "), "{code:?}: {msg}");
    identity::bind(&ns, "erin-preview", "ClusterRole", "preview-user", identity::user("erin")).await?;
    identity::grant(&ns, "erin-workloads", identity::workload_rules(), identity::user("erin")).await?;
    let erin = preview::cli::Credentials {
        identity: Some(identity::cluster_certificate("erin", &[])?),
        ca_pem: Some(previewd_ca().await?),
        token: None,
    };
    let mut erin = preview::cli::connect_with(&p.addr, &erin).await?;
    let (code, msg) = refused(erin.share(share("demo")).await)?;
    ensure!(code == tonic::Code::PermissionDenied && msg.contains("share"), "{code:?}: {msg}");
    let listed = c.share(proto::ShareRequest { list: true, ..share("demo") }).await?.into_inner().links;
    ensure!(listed.len() == 1 && listed[0].url == link, "{listed:?}");

    // A second link, revoked: it ends at once, the first lives on.
    let second = c.share(proto::ShareRequest { service: "frontend".into(), ..share("demo") }).await?.into_inner();
    let second = second.links.first().context("no link")?.url.clone();
    eventually("the second link to open", Duration::from_secs(30), || async {
        Ok((status_of(port, &second).await? == 200).then_some(()))
    })
    .await?;
    c.share(proto::ShareRequest { revoke: second.clone(), ..share("demo") }).await?;
    eventually("the revoked link to end", Duration::from_secs(30), || async {
        Ok((status_of(port, &second).await? == 410).then_some(()))
    })
    .await?;
    ensure!(status_of(port, &link).await? == 200, "revoking one link ended another");
    // A link with its own TTL ends before its environment.
    let brief = c.share(proto::ShareRequest { ttl: "2s".into(), ..share("demo") }).await?.into_inner();
    let brief = brief.links.first().context("no link")?.url.clone();
    eventually("the 2 s link to end", Duration::from_secs(30), || async {
        Ok((status_of(port, &brief).await? == 410).then_some(()))
    })
    .await?;
    // previewd's reaper moves it to the ended links (the gateway stopped it at its expiry already).
    eventually("the 2 s link to leave the environment", Duration::from_secs(30), || async {
        let listed = c.clone().share(proto::ShareRequest { list: true, ..share("demo") }).await?.into_inner().links;
        Ok((listed.len() == 1 && listed[0].url == link).then_some(()))
    })
    .await?;

    // Clean: the link ends with its environment.
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("demo".into())) }).await?;
    eventually("the link to end with its environment", Duration::from_secs(30), || async {
        Ok((status_of(port, &link).await? == 410).then_some(()))
    })
    .await?;
    let unknown = format!("http://{}.{domain}/", "a".repeat(20));
    let got = browser(json!([
        {"url": link, "expect": "page", "screenshot": screenshot("share-link-ended.png")?},
        {"url": second, "expect": "page"},
        {"url": unknown, "expect": "page"},
    ]))
    .await?;
    for (page, why) in [(&got[0], "cleaned"), (&got[1], "revoked")] {
        ensure!(page["status"] == 410, "{why}: {page}");
        let text = page["text"].as_str().unwrap_or_default();
        ensure!(text.contains("This preview has ended") && !text.contains("preview-echo"), "{why}: {page}");
    }
    ensure!(got[0]["text"].as_str().is_some_and(|t| t.contains("Go to staging")), "{}", got[0]);
    ensure!(got[2]["status"] == 404, "unknown slug: {}", got[2]);
    clean_all(&mut c).await?;
    p.stop().await
}
