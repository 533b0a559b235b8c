//! Network namespaces for data-plane tests and benchmarks:
//!
//!   client ns 198.18.100.1 ── 198.18.100.2 pod ns (app :8080, :8081, :9000, :9090 + agent)
//!                                198.18.101.1 ── 198.18.101.2 preview ns (v2)
//!                                             └─ 198.18.101.3          (v3)

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, ensure};

pub const POD: &str = "198.18.100.2";

pub struct Net {
    id: String,
    pub procs: Vec<Child>,
    pub dir: tempfile::TempDir,
}

pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("{args:?}"))?;
    ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Net {
    pub fn ns(&self, which: &str) -> String {
        format!("pa{}{which}", self.id)
    }

    pub fn new() -> Result<Net> {
        let id = preview::model::Key::generate()[..6].to_string();
        let net = Net { id, procs: Vec::new(), dir: tempfile::tempdir()? };
        let (c, p, v) = (net.ns("c"), net.ns("p"), net.ns("v"));
        for n in [&c, &p, &v] {
            sh(&["ip", "netns", "add", n])?;
            sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        }
        let (c0, p0, p1, v1) = (format!("{c}0"), format!("{p}0"), format!("{p}1"), format!("{v}1"));
        sh(&["ip", "link", "add", &c0, "netns", &c, "type", "veth", "peer", "name", &p0, "netns", &p])?;
        sh(&["ip", "link", "add", &p1, "netns", &p, "type", "veth", "peer", "name", &v1, "netns", &v])?;
        for (n, dev, addr) in [
            (&c, &c0, "198.18.100.1/24"),
            (&p, &p0, "198.18.100.2/24"),
            (&p, &p1, "198.18.101.1/24"),
            (&v, &v1, "198.18.101.2/24"),
            (&v, &v1, "198.18.101.3/24"),
        ] {
            sh(&["ip", "-n", n, "addr", "add", addr, "dev", dev])?;
            sh(&["ip", "-n", n, "link", "set", dev, "up"])?;
        }
        Ok(net)
    }

    pub fn spawn(&mut self, ns: &str, args: &[&str]) -> Result<usize> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(self.dir.path().join(format!("{}.log", self.procs.len())))?))
            .process_group(0)
            .spawn()?;
        self.procs.push(child);
        Ok(self.procs.len() - 1)
    }

    /// App v1 on :8080 and :8081 (+ raw echo on :9000, gRPC on :9090) in the
    /// pod, v2 and v3 previews.
    pub fn servers(&mut self) -> Result<()> {
        let echo = env!("CARGO_BIN_EXE_preview-echo");
        let (p, v) = (self.ns("p"), self.ns("v"));
        self.spawn(
            &p,
            &[
                echo,
                "serve",
                "--listen",
                // :8081 is never intercepted: the benchmark's direct path.
                "0.0.0.0:8080,0.0.0.0:8081",
                "--version",
                "v1",
                "--tcp-echo",
                "0.0.0.0:9000",
                "--grpc-listen",
                "0.0.0.0:9090",
            ],
        )?;
        self.spawn(
            &v,
            &[echo, "serve", "--listen", "198.18.101.2:8080", "--version", "v2", "--grpc-listen", "198.18.101.2:9090"],
        )?;
        self.spawn(
            &v,
            &[echo, "serve", "--listen", "198.18.101.3:8080", "--version", "v3", "--grpc-listen", "198.18.101.3:9090"],
        )?;
        Ok(())
    }

    /// Namespaces, servers, the given routes and a running agent; returns
    /// the agent's index in `procs`.
    pub fn with_agent(routes: serde_json::Value) -> Result<(Net, usize)> {
        let mut net = Net::new()?;
        net.servers()?;
        net.set_routes(routes)?;
        let agent = net.agent()?;
        Ok((net, agent))
    }

    pub fn routes_path(&self) -> PathBuf {
        self.dir.path().join("routes.json")
    }

    pub fn set_routes(&self, routes: serde_json::Value) -> Result<()> {
        let tmp = self.dir.path().join("routes.tmp");
        std::fs::write(&tmp, routes.to_string())?;
        std::fs::rename(tmp, self.routes_path())?;
        Ok(())
    }

    /// An agent that exits as soon as no route is left (`--linger 0s`).
    pub fn agent(&mut self) -> Result<usize> {
        self.agent_with(&["--linger", "0s"])
    }

    pub fn agent_with(&mut self, extra: &[&str]) -> Result<usize> {
        self.agent_bin(env!("CARGO_BIN_EXE_preview-agent"), extra)
    }

    /// The agent from the binary at `agent` (the release build, say).
    pub fn agent_bin(&mut self, agent: &str, extra: &[&str]) -> Result<usize> {
        let routes = self.routes_path();
        let p = self.ns("p");
        let mut args = vec![agent, "run", "--ports", "8080,9000,9090", "--routes", routes.to_str().unwrap_or_default()];
        args.extend(extra);
        self.spawn(&p, &args)
    }

    /// REDIRECT rules in agent chains: what takes connections to an agent.
    pub fn redirects(&self) -> Result<usize> {
        let out = sh(&["ip", "netns", "exec", &self.ns("p"), "iptables", "-w", "-t", "nat", "-S"])?;
        Ok(out.lines().filter(|l| l.starts_with("-A PREVIEW-AGENT-") && l.contains("-j REDIRECT")).count())
    }

    pub fn chains(&self) -> Result<Vec<String>> {
        let out = sh(&["ip", "netns", "exec", &self.ns("p"), "iptables", "-w", "-t", "nat", "-S"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.strip_prefix("-N "))
            .filter(|c| c.starts_with("PREVIEW-AGENT-"))
            .map(String::from)
            .collect())
    }

    /// Runs `f` on a thread inside the client namespace and waits for it.
    pub fn client<T: Send + 'static, Fut: std::future::Future<Output = Result<T>>>(
        &self,
        f: impl FnOnce() -> Fut + Send + 'static,
    ) -> Result<T> {
        let r = self.client_thread(f).join().map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        r.map_err(|e| e.context(self.logs()))
    }

    /// Process `idx`'s whole log.
    pub fn log(&self, idx: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{idx}.log"))).unwrap_or_default()
    }

    /// The last lines of every process's log, for a failure's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.procs.len() {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{i}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!("--- process {i} log (last 15 lines)\n"));
            for l in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Starts `f` on a thread inside the client namespace (with its own
    /// runtime, bounded at 90 s) and returns the thread.
    pub fn client_thread<T: Send + 'static, Fut: std::future::Future<Output = Result<T>>>(
        &self,
        f: impl FnOnce() -> Fut + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        self.thread_in("c", f)
    }

    /// Starts `f` on a thread inside namespace `which` ("c", "p" or "v").
    pub fn thread_in<T: Send + 'static, Fut: std::future::Future<Output = Result<T>>>(
        &self,
        which: &str,
        f: impl FnOnce() -> Fut + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = format!("/var/run/netns/{}", self.ns(which));
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path)?;
            // SAFETY: setns on this thread only, with an fd we own.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) };
            ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
            // A hung client is a failure, not a hung suite.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(90), f()).await })
                .map_err(|_| anyhow::anyhow!("client in {path} timed out after 90 s"))?
        })
    }

    pub fn kill(&mut self, idx: usize, signal: i32) {
        if let Ok(pid) = i32::try_from(self.procs[idx].id()) {
            // SAFETY: signalling a child we spawned.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Ok(pid) = i32::try_from(p.id()) {
                // SAFETY: kill(2) on the process group of a child we spawned.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = p.wait();
        }
        // `ip netns exec` children die with their parent's kill only if they
        // are the exec'd process (they are: ip execs the command).
        for n in ["c", "p", "v"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(n)]).status();
        }
    }
}
