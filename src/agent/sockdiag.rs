//! Resetting connections that reach the app around the agent: TCP sockets on
//! an intercepted port that the app accepted before the agent's rules, found
//! and aborted through the kernel's sock_diag netlink interface (SOCK_DESTROY,
//! what `ss -K` does). The agent has CAP_NET_ADMIN for iptables; that is all
//! this needs.
//!
//! Why not only flush conntrack: a connection whose first packet after the
//! flush comes from the app (a response in flight) is picked up in reverse,
//! and the client's packets then match it as replies, reaching the app
//! around the agent for as long as the connection lives.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// Established, and handshakes the app's listener is completing.
const STATES: u32 = (1 << 1) | (1 << 3);
const HDR: usize = 16;
/// `struct inet_diag_sockid`: ports and addresses in network order.
const ID: usize = 48;

/// One socket as the kernel names it (`inet_diag_sockid`, cookie included).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sock {
    family: u8,
    id: [u8; ID],
}

impl Sock {
    fn local_port(&self) -> u16 {
        u16::from_be_bytes([self.id[0], self.id[1]])
    }

    fn addr(&self, at: usize) -> IpAddr {
        let b = &self.id[at..at + 16];
        if i32::from(self.family) == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            let v6: [u8; 16] = b.try_into().unwrap_or([0; 16]);
            let v6 = Ipv6Addr::from(v6);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
    }

    /// The peer is in this pod: the agent's own connections to the app, or
    /// the pod calling itself. Those never went through PREROUTING.
    fn peer_is_local(&self) -> bool {
        let (local, peer) = (self.addr(4), self.addr(20));
        peer == local || peer.is_loopback()
    }
}

/// Aborts every connection to `port` from outside the pod that the app
/// holds (established or being accepted). Each peer gets a reset and
/// reconnects, now through the agent. Returns how many were reset.
pub fn reset_direct(port: u16) -> io::Result<usize> {
    let nl = Netlink::open()?;
    let mut found = nl.dump(libc::AF_INET as u8)?;
    // A kernel without IPv6 cannot list it; the IPv4 sockets still go.
    match nl.dump(libc::AF_INET6 as u8) {
        Ok(v6) => found.extend(v6),
        Err(e) => tracing::debug!(error = %e, "listing IPv6 sockets"),
    }
    let mut reset = 0;
    for s in found.iter().filter(|s| s.local_port() == port && !s.peer_is_local()) {
        match nl.destroy(s) {
            Ok(()) => reset += 1,
            // Closed meanwhile: nothing to do.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(reset)
}

struct Netlink(OwnedFd);

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket nobody else owns.
        let nl = Netlink(unsafe { OwnedFd::from_raw_fd(fd) });
        // The kernel always answers; bounded all the same, so the agent never hangs here.
        let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
        // SAFETY: setsockopt reads a timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                nl.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(nl)
    }

    /// Every TCP socket of `family` in STATES.
    fn dump(&self, family: u8) -> io::Result<Vec<Sock>> {
        self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family, &[0; ID])?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 << 10];
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, body) in messages(&buf[..n]) {
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => errno(body)?,
                    // inet_diag_msg: family, state, timer, retrans, then the id.
                    SOCK_DIAG_BY_FAMILY if body.len() >= 4 + ID => {
                        let id: [u8; ID] = body[4..4 + ID].try_into().unwrap_or([0; ID]);
                        out.push(Sock { family: body[0], id });
                    }
                    _ => {}
                }
            }
        }
    }

    fn destroy(&self, s: &Sock) -> io::Result<()> {
        self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, s.family, &s.id)?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, body) in messages(&buf[..n]) {
                if kind == NLMSG_ERROR {
                    return errno(body);
                }
            }
        }
    }

    /// A header and an `inet_diag_req_v2` for TCP.
    fn send(&self, kind: u16, flags: u16, family: u8, id: &[u8; ID]) -> io::Result<()> {
        let len = HDR + 8 + ID;
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&[0; 8]); // sequence and port id: the kernel's are fine
        m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
        m.extend_from_slice(&STATES.to_ne_bytes());
        m.extend_from_slice(id);
        // SAFETY: sends `m.len()` bytes from a live buffer.
        let rc = unsafe { libc::send(self.0.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let rc = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(rc).map_err(|_| io::Error::last_os_error())
    }
}

/// The netlink messages in one datagram: (type, payload).
fn messages(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < HDR {
            return None;
        }
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < HDR || len > b.len() {
            return None;
        }
        let body = &b[HDR..len];
        // Messages are 4-byte aligned.
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, body))
    })
}

/// An NLMSG_ERROR's errno (0 is an ack).
fn errno(body: &[u8]) -> io::Result<()> {
    let code = body.get(..4).map_or(0, |c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
    if code == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-code)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(family: i32, local: [u8; 16], peer: [u8; 16], port: u16) -> Sock {
        let mut id = [0u8; ID];
        id[..2].copy_from_slice(&port.to_be_bytes());
        id[4..20].copy_from_slice(&local);
        id[20..36].copy_from_slice(&peer);
        Sock { family: family as u8, id }
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut b = [0; 16];
        b[..4].copy_from_slice(&a);
        b
    }

    fn mapped(a: [u8; 4]) -> [u8; 16] {
        Ipv4Addr::from(a).to_ipv6_mapped().octets()
    }

    #[test]
    fn only_peers_outside_the_pod_are_reset() {
        let pod = [198, 18, 0, 5];
        assert!(!sock(libc::AF_INET, v4(pod), v4([198, 18, 0, 9]), 8080).peer_is_local());
        assert!(sock(libc::AF_INET, v4(pod), v4(pod), 8080).peer_is_local());
        assert!(sock(libc::AF_INET, v4([127, 0, 0, 1]), v4([127, 0, 0, 1]), 8080).peer_is_local());
        // A dual-stack listener's IPv4 peers are v4-mapped.
        assert!(!sock(libc::AF_INET6, mapped(pod), mapped([198, 18, 0, 9]), 8080).peer_is_local());
        assert!(sock(libc::AF_INET6, mapped(pod), mapped(pod), 8080).peer_is_local());
        assert!(sock(libc::AF_INET6, mapped(pod), Ipv6Addr::LOCALHOST.octets(), 8080).peer_is_local());
        assert_eq!(sock(libc::AF_INET, v4(pod), v4(pod), 8080).local_port(), 8080);
    }

    #[test]
    fn messages_split_on_aligned_lengths() {
        let mut b = Vec::new();
        for (kind, body) in [(20u16, vec![1u8, 2, 3]), (3, vec![])] {
            b.extend_from_slice(&((HDR + body.len()) as u32).to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(&[0; 10]);
            b.extend_from_slice(&body);
            b.resize((b.len() + 3) & !3, 0);
        }
        let got: Vec<(u16, Vec<u8>)> = messages(&b).map(|(k, m)| (k, m.to_vec())).collect();
        assert_eq!(got, vec![(20, vec![1, 2, 3]), (3, vec![])]);
        assert_eq!(errno(&(-libc::ENOENT).to_ne_bytes()).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert!(errno(&0i32.to_ne_bytes()).is_ok());
    }
}
