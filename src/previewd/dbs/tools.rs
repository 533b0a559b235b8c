//! Running the engines' dump and load tools (Debian's `pg_dump`, `psql`,
//! `mariadb-dump`, `mariadb`) as children of previewd, piped into each other.

use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};

/// How much of a failed tool's stderr an error carries.
const STDERR_TAIL: usize = 600;

/// `program`, with no stdin, killed with previewd: a kill -9 of previewd
/// leaves no copy running into a database that recovery drops.
pub fn command(program: &Path) -> Command {
    let mut c = Command::new(program);
    c.stdin(Stdio::null()).kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe, and touches nothing of ours.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    c
}

/// `a | b`, both checked; an error is the failing side's stderr.
pub async fn pipe(a: Command, b: Command) -> Result<(), String> {
    into(start(a)?, b).await
}

/// `a`, started, its output waiting for `into`.
pub fn start(mut a: Command) -> Result<Child, String> {
    a.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| format!("starting a dump: {e}"))
}

/// `left | b`, both checked; an error is the failing side's stderr.
pub async fn into(mut left: Child, mut b: Command) -> Result<(), String> {
    // Just spawned with a piped stdout.
    let out: Stdio = left.stdout.take().expect("piped stdout").try_into().map_err(|e| format!("{e}"))?;
    let right = b
        .stdin(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting a restore: {e}"))?;
    let (l, r) = tokio::join!(left.wait_with_output(), right.wait_with_output());
    let (l, r) = (l.map_err(|e| e.to_string())?, r.map_err(|e| e.to_string())?);
    for (o, who) in [(&l, "the dump"), (&r, "the restore")] {
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            let err = err.trim();
            let mut from = err.len().saturating_sub(STDERR_TAIL);
            while !err.is_char_boundary(from) {
                from += 1;
            }
            let tail = &err[from..];
            return Err(format!("{who} failed ({}): {tail}", o.status));
        }
    }
    Ok(())
}
