//! Traffic interception in the pod's network namespace: nat rules in a chain
//! of our own that redirect incoming TCP for the target's ports to the agent.
//!
//! Inbound (target pods) hooks PREROUTING only, so the agent's own
//! connections to the app (which leave through OUTPUT) never loop back.
//! Outbound (preview pods) hooks OUTPUT and skips the agent's own sockets by
//! their group id.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// Every agent chain starts with this; the rest is unique per agent.
pub const CHAIN_PREFIX: &str = "PREVIEW-AGENT-";

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("no working iptables backend (tried iptables-nft, iptables-legacy, iptables): {0}")]
    NoBackend(String),
    #[error("{cmd}: {message}")]
    Command { cmd: String, message: String },
}

/// An iptables flavour that works in this namespace.
#[derive(Debug, Clone)]
pub struct Backend {
    pub iptables: String,
    pub restore: String,
}

impl Backend {
    /// The first backend that can list the nat table here. A backend that
    /// already holds our chains wins, so cleanup finds them.
    pub fn detect() -> Result<Backend, InterceptError> {
        let mut working = Vec::new();
        let mut last = String::new();
        for (ipt, restore) in [
            ("iptables-nft", "iptables-nft-restore"),
            ("iptables-legacy", "iptables-legacy-restore"),
            ("iptables", "iptables-restore"),
        ] {
            match Command::new(ipt).args(["-w", "-t", "nat", "-S"]).stderr(Stdio::piped()).output() {
                Ok(out) if out.status.success() => {
                    let b = Backend { iptables: ipt.into(), restore: restore.into() };
                    if String::from_utf8_lossy(&out.stdout).contains(CHAIN_PREFIX) {
                        return Ok(b);
                    }
                    working.push(b);
                }
                Ok(out) => last = String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) => last = format!("{ipt}: {e}"),
            }
        }
        working.into_iter().next().ok_or(InterceptError::NoBackend(last))
    }

    fn run(&self, args: &[&str]) -> Result<String, InterceptError> {
        let out = Command::new(&self.iptables).arg("-w").args(args).output().map_err(|e| InterceptError::Command {
            cmd: format!("{} {}", self.iptables, args.join(" ")),
            message: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(InterceptError::Command {
                cmd: format!("{} {}", self.iptables, args.join(" ")),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Installs the chain and the jump to it in one atomic restore.
    pub fn install(&self, chain: &str, dir: &Direction, to_port: u16) -> Result<(), InterceptError> {
        let mut rules = format!("*nat\n:{chain} - [0:0]\n{}", dir.rules(chain, to_port));
        rules.push_str(&format!("-I {} 1 -j {chain}\nCOMMIT\n", dir.hook()));
        self.restore(&rules)
    }

    /// Replaces the chain's rules in one atomic restore; the jump stays.
    /// (`--noflush` still flushes a chain that the input declares.)
    pub fn update(&self, chain: &str, dir: &Direction, to_port: u16) -> Result<(), InterceptError> {
        self.restore(&format!("*nat\n:{chain} - [0:0]\n{}COMMIT\n", dir.rules(chain, to_port)))
    }

    fn restore(&self, rules: &str) -> Result<(), InterceptError> {
        let cmd = format!("{} --noflush", self.restore);
        let fail = |e: std::io::Error| InterceptError::Command { cmd: cmd.clone(), message: e.to_string() };
        let mut child = Command::new(&self.restore)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(fail)?;
        child.stdin.take().map(|mut s| s.write_all(rules.as_bytes())).transpose().map_err(fail)?;
        let out = child.wait_with_output().map_err(fail)?;
        if !out.status.success() {
            return Err(InterceptError::Command {
                cmd,
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Removes one chain and every jump to it; missing pieces are fine.
    pub fn remove(&self, chain: &str) -> Result<(), InterceptError> {
        for hook in ["PREROUTING", "OUTPUT"] {
            let rules = self.run(&["-t", "nat", "-S", hook])?;
            for rule in rules.lines().filter(|r| r.ends_with(&format!("-j {chain}"))) {
                let args: Vec<&str> = rule.split_whitespace().collect();
                if args.first() == Some(&"-A") {
                    let mut del = vec!["-t", "nat", "-D"];
                    del.extend(&args[1..]);
                    self.run(&del)?;
                }
            }
        }
        let _ = self.run(&["-t", "nat", "-F", chain]);
        let _ = self.run(&["-t", "nat", "-X", chain]);
        Ok(())
    }

    /// Our chains present in this namespace.
    pub fn chains(&self) -> Result<Vec<String>, InterceptError> {
        let rules = self.run(&["-t", "nat", "-S"])?;
        Ok(rules
            .lines()
            .filter_map(|l| l.strip_prefix("-N "))
            .filter(|c| c.starts_with(CHAIN_PREFIX))
            .map(str::to_string)
            .collect())
    }

    /// Removes every agent chain (the `cleanup` mode, and stale ones at start).
    pub fn remove_all(&self) -> Result<Vec<String>, InterceptError> {
        let chains = self.chains()?;
        for c in &chains {
            self.remove(c)?;
        }
        Ok(chains)
    }
}

/// What a chain redirects to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// Incoming TCP to these ports (a target pod).
    Inbound(Vec<u16>),
    /// Every outgoing TCP connection except to loopback and the agent's own,
    /// recognised by its group id (a preview pod, for key propagation).
    Outbound { agent_gid: u32 },
}

impl Direction {
    fn hook(&self) -> &'static str {
        match self {
            Direction::Inbound(_) => "PREROUTING",
            Direction::Outbound { .. } => "OUTPUT",
        }
    }

    fn rules(&self, chain: &str, to_port: u16) -> String {
        match self {
            // The first rule does nothing (nat sees only a connection's first
            // packet) but keeps conntrack on in this namespace: with no rule
            // needing it the kernel turns it off, and connections already
            // redirected to the agent lose their translation and get reset.
            // So an idle agent (no ports) keeps them, and its FINs leave right.
            Direction::Inbound(ports) => {
                std::iter::once(format!("-A {chain} -m conntrack --ctstate ESTABLISHED -j RETURN\n"))
                    .chain(
                        ports.iter().map(|p| {
                            format!("-A {chain} -p tcp -m tcp --dport {p} -j REDIRECT --to-ports {to_port}\n")
                        }),
                    )
                    .collect()
            }
            Direction::Outbound { agent_gid } => format!(
                "-A {chain} -m owner --gid-owner {agent_gid} -j RETURN\n\
                 -A {chain} -d 127.0.0.0/8 -j RETURN\n\
                 -A {chain} -p tcp -j REDIRECT --to-ports {to_port}\n"
            ),
        }
    }
}

/// Forgets conntrack state for connections to `port` that go straight to the
/// app, so connections made before the rules existed re-enter nat (and reach
/// the agent) or reset. Connections already redirected to the agent (their
/// replies come from its port, not `port`) keep their entries: without one
/// the agent cannot read their original destination, and its reset would
/// leave un-NATed and be ignored, leaving the client hanging.
pub fn flush_conntrack(port: u16) {
    let port = port.to_string();
    // Exit code 1 means "no entries"; a missing binary is logged only.
    match Command::new("conntrack")
        .args(["-D", "-p", "tcp", "--orig-port-dst", &port, "--reply-port-src", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) => tracing::warn!(port, error = %e, "conntrack not available; old connections keep going to the app"),
    }
}

/// A fresh chain name: the prefix and 6 random characters (≤ 28 in all).
pub fn chain_name() -> String {
    format!("{CHAIN_PREFIX}{}", &crate::model::Key::generate()[..6]).to_uppercase()
}

/// The address a redirected connection was originally sent to.
pub fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `addr`, a sockaddr_in.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(addr.sin_port))))
}
