//! The `preview` CLI against a real previewd and cluster: start prints the
//! key and waits until Ready, status renders the table and JSON, clean
//! removes, and errors exit with 1 (failure) or 2 (usage) and say what to fix.

mod common;

use std::process::Command;

use anyhow::{Context, Result, ensure};
use common::*;

fn preview(server: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_preview")).env("PREVIEW_SERVER", server).args(args).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn start_status_clean_and_exit_codes() -> Result<()> {
    let ns = TestNs::new("t-cli").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    let d = Previewd::start(&ns).await?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("orders.yaml");
    std::fs::write(&cfg, "target: deployment/orders\nfeature:\n  preview: {ttl_mins: 30}\n")?;
    let cfg = cfg.to_str().context("path")?.to_string();
    let server = d.addr.clone();

    // start blocks until the pod is Ready; runs on a blocking thread meanwhile.
    let (s, c) = (server.clone(), cfg.clone());
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        preview(&s, &["start", "-f", &c, "--image", "preview.local/echo:v2", "--key", "cli1", "--timeout", "90s"])
    })
    .await??;
    ensure!(code == 0, "start exited {code}: {err}");
    ensure!(out.lines().next() == Some("key: cli1"), "first line: {out}");
    ensure!(out.contains("running (29m remaining)") || out.contains("running (30m remaining)"), "{out}");

    let s = server.clone();
    let (code, out, _) = tokio::task::spawn_blocking(move || preview(&s, &["status", "-o", "json"])).await??;
    ensure!(code == 0);
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        v[0]["key"] == "cli1" && v[0]["pods"][0]["ready"] == true && v[0]["pods"][0]["target"] == "deployment/orders",
        "{v}"
    );
    let s = server.clone();
    let (_, table, _) = tokio::task::spawn_blocking(move || preview(&s, &["status", "--key", "cli1"])).await??;
    ensure!(table.starts_with("KEY") && table.contains("cli1") && table.contains("preview.local/echo:v2"), "{table}");

    // Failures: a missing image is a clear error (1); bad flags are usage (2).
    let (s, c) = (server.clone(), cfg.clone());
    let (code, _, err) =
        tokio::task::spawn_blocking(move || preview(&s, &["start", "-f", &c, "--key", "cli2"])).await??;
    ensure!(code == 1 && err.contains("image"), "{code} {err}");
    let s = server.clone();
    let (code, _, _) = tokio::task::spawn_blocking(move || preview(&s, &["status", "-o", "xml"])).await??;
    ensure!(code == 2, "usage error exit {code}");
    let (code, _, err) = tokio::task::spawn_blocking(|| preview("previewd:7443", &["status"])).await??;
    ensure!(code == 2 && err.contains("expected a URL like http://previewd:7443"), "{code} {err}");
    let (code, _, err) = tokio::task::spawn_blocking(|| preview("http://127.0.0.1:9", &["status"])).await??;
    ensure!(
        code == 1 && err.contains("cannot reach previewd through http://127.0.0.1:9") && err.lines().count() == 1,
        "{code} {err}"
    );

    let s = server.clone();
    let (code, out, _) = tokio::task::spawn_blocking(move || preview(&s, &["clean", "--key", "cli1"])).await??;
    ensure!(code == 0 && out.contains("cleaned cli1 (2 objects)"), "{out}");
    let s = server.clone();
    let (_, out, _) = tokio::task::spawn_blocking(move || preview(&s, &["clean", "--key", "cli1"])).await??;
    ensure!(out.contains("nothing to clean"), "{out}");
    d.stop().await
}

/// A server that is not this version (here: a health service claiming
/// 0.0.1): the CLI warns, names both versions, and goes on.
#[tokio::test]
async fn version_mismatch_warns() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", listener.local_addr()?);
    let (_health, service) = tonic_health::server::health_reporter();
    let old = tower::util::MapResponseLayer::new(|mut r: http::Response<_>| {
        r.headers_mut().insert("preview-version", http::HeaderValue::from_static("0.0.1"));
        r
    });
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(old)
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let a = addr.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || preview(&a, &["version"])).await??;
    ensure!(code == 0, "{code} {err}");
    ensure!(out == format!("client: {}\nserver: 0.0.1\n", env!("CARGO_PKG_VERSION")), "{out}");
    // Any other command warns first (and then fails here: no PreviewService).
    let (code, _, err) = tokio::task::spawn_blocking(move || preview(&addr, &["status"])).await??;
    let want = format!("warning: preview {} talks to previewd 0.0.1", env!("CARGO_PKG_VERSION"));
    ensure!(code == 1 && err.starts_with(&want), "{code} {err}");
    server.abort();
    Ok(())
}

#[test]
fn completion_scripts() -> Result<()> {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef preview"), ("fish", "complete -c preview")] {
        let out = Command::new(env!("CARGO_BIN_EXE_preview")).args(["completion", shell]).output()?;
        let script = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success() && script.contains(marker), "{shell}: {script}");
        ensure!(script.contains("add-pod") && script.contains("previewd-namespace"), "{shell} lacks subcommands/flags");
    }
    Ok(())
}
