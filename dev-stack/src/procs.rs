//! Child processes of the stack: finding system servers, free ports, spawning
//! with output to a log file, probing ports and HTTP endpoints, and stopping
//! with SIGTERM, a grace period and SIGKILL for stragglers.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Folders searched after `PATH` for system servers (Debian puts
/// `nats-server` in `/usr/sbin`).
pub const EXTRA_DIRS: [&str; 5] = ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin", "/sbin"];

/// Finds `name` in `dirs`, or says which Debian package to install.
pub fn find_in(dirs: &[PathBuf], name: &str, package: &str) -> Result<PathBuf, String> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(|| {
        format!(
            "`{name}` was not found on PATH or in /usr/sbin: install the `{package}` package \
             (`apt-get install -y {package}`, or run `bash scripts/ensure-deps.sh`)"
        )
    })
}

/// Finds a system server on `PATH` or in [`EXTRA_DIRS`].
pub fn find_system_binary(name: &str, package: &str) -> Result<PathBuf, String> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(EXTRA_DIRS.map(PathBuf::from));
    find_in(&dirs, name, package)
}

/// Picks ports: each `Some` is checked to be free, each `None` becomes a
/// distinct free port. All probes are held until every port is chosen, so
/// two `None`s never get the same port.
pub fn pick_ports(wanted: &[(&str, Option<u16>)]) -> Result<Vec<u16>, String> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    for (what, port) in wanted {
        let listener = TcpListener::bind(("127.0.0.1", port.unwrap_or(0))).map_err(|e| match port {
            Some(p) => format!("port {p} for {what} is not free on 127.0.0.1: {e}"),
            None => format!("no free port on 127.0.0.1 for {what}: {e}"),
        })?;
        let p = listener.local_addr().map_err(|e| e.to_string())?.port();
        held.push(listener);
        out.push(p);
    }
    Ok(out)
}

/// `n` distinct free ports whose Redis Cluster bus port (`port + 10000`)
/// is free and valid too (`redis-server --cluster-enabled` listens on both).
pub fn pick_cluster_ports(n: usize) -> Result<Vec<u16>, String> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    for _ in 0..1000 {
        if out.len() == n {
            return Ok(out);
        }
        let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("no free port: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        held.push(listener);
        let Some(bus) = port.checked_add(10000) else { continue };
        if let Ok(b) = TcpListener::bind(("127.0.0.1", bus)) {
            held.push(b);
            out.push(port);
        }
    }
    Err(format!("found only {} of {n} free port pairs (port and port + 10000) for the Redis Cluster", out.len()))
}

/// A running child with its output in a log file.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
    child: Child,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout/stderr appended to `log`, in
    /// its own process group (a terminal's Ctrl-C reaches only the stack,
    /// which then stops the children in order). Killed if dropped.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{name}: log file {}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| format!("{name}: {e}"))?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(err).kill_on_drop(true).process_group(0);
        let child = cmd.spawn().map_err(|e| format!("could not start {name}: {e}"))?;
        let pid = child.id().ok_or_else(|| format!("{name} exited at once"))?;
        Ok(Self { name: name.to_string(), pid, log: log.to_path_buf(), child, exited: None })
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends SIGTERM (through the `kill` command, no unsafe code).
    pub fn terminate(&mut self) {
        if self.exited().is_none() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Waits until `deadline` for the process to exit after [`terminate`],
    /// then SIGKILLs it. Returns whether it had to be killed.
    ///
    /// [`terminate`]: Proc::terminate
    pub async fn wait_or_kill(&mut self, deadline: tokio::time::Instant) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = Some(status);
                false
            }
            _ => {
                let _ = self.child.kill().await;
                self.exited = self.child.try_wait().ok().flatten();
                true
            }
        }
    }
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub async fn port_open(port: u16) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    matches!(tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await, Ok(Ok(_)))
}

/// A minimal `GET` on `127.0.0.1:port`: the status code and the body.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(3), io)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", text.chars().take(60).collect::<String>()))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let e = find_in(&[dir.path().to_path_buf()], "nats-server", "nats-server").unwrap_err();
        assert!(e.contains("apt-get install -y nats-server"), "{e}");
        std::fs::write(dir.path().join("redis-server"), "").unwrap();
        assert_eq!(
            find_in(&[dir.path().to_path_buf()], "redis-server", "redis-server").unwrap(),
            dir.path().join("redis-server")
        );
    }

    #[test]
    fn free_ports_are_distinct_and_busy_ports_refused() {
        let ports = pick_ports(&[("a", None), ("b", None), ("c", None)]).unwrap();
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = busy.local_addr().unwrap().port();
        let e = pick_ports(&[("edge 1", Some(p))]).unwrap_err();
        assert!(e.contains("edge 1") && e.contains(&p.to_string()), "{e}");
    }

    #[tokio::test]
    async fn terminate_then_wait_stops_a_child() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = Proc::spawn("sleep", cmd, &dir.path().join("sleep.log")).unwrap();
        assert!(p.exited().is_none());
        p.terminate();
        let killed = p.wait_or_kill(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        assert!(!killed, "sleep should exit on SIGTERM");
        assert!(p.exited().is_some());
        assert!(!Path::new(&format!("/proc/{}", p.pid)).exists());
    }
}
