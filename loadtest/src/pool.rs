//! The parent's side of the workers: spawns `daisi-loadtest worker`
//! processes, hands each its share of the sockets, sends commands and sums
//! what they report.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::wire::{Command, Event, Job, Progress, WorkerReport};

struct Worker {
    child: Child,
    stdin: ChildStdin,
    events: mpsc::UnboundedReceiver<Event>,
}

/// Running workers.
pub struct Pool {
    workers: Vec<Worker>,
    progress: Arc<Mutex<Vec<Progress>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// Starts one worker per job (`exe worker`).
    pub async fn spawn(exe: &PathBuf, jobs: Vec<Job>) -> anyhow::Result<Self> {
        let progress = Arc::new(Mutex::new(vec![Progress::default(); jobs.len()]));
        let mut workers = Vec::new();
        for (i, job) in jobs.into_iter().enumerate() {
            let mut child = tokio::process::Command::new(exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {}", exe.display()))?;
            let mut stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let (tx, events) = mpsc::unbounded_channel();
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Event>(&line) {
                        Ok(Event::Progress(p)) => lock(&progress)[i] = p,
                        Ok(e) => {
                            if let Event::Connected { progress: p, .. }
                            | Event::PingDone { progress: p }
                            | Event::TakeoverDone { progress: p, .. } = &e
                            {
                                lock(&progress)[i] = p.clone();
                            }
                            if let Event::Report(r) = &e {
                                lock(&progress)[i] = r.progress.clone();
                            }
                            if tx.send(e).is_err() {
                                break;
                            }
                        }
                        Err(e) => eprintln!("worker {i}: unreadable line ({e}): {line}"),
                    }
                }
            });
            let mut line = serde_json::to_string(&job)?;
            line.push('\n');
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await?;
            workers.push(Worker { child, stdin, events });
        }
        Ok(Self { workers, progress })
    }

    /// Process ids of the workers.
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(|w| w.child.id()).collect()
    }

    /// The workers' counters, summed.
    pub fn total(&self) -> Progress {
        let mut t = Progress::default();
        for p in lock(&self.progress).iter() {
            t.add(p);
        }
        t
    }

    async fn send(&mut self, cmd: &Command) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(cmd)?;
        line.push('\n');
        for w in &mut self.workers {
            w.stdin.write_all(line.as_bytes()).await?;
            w.stdin.flush().await?;
        }
        Ok(())
    }

    /// Waits for the next non-progress event of every worker, calling `tick`
    /// with the summed counters meanwhile.
    async fn each_next(&mut self, within: Duration, mut tick: impl FnMut(&Progress)) -> anyhow::Result<Vec<Event>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        for i in 0..self.workers.len() {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    bail!("worker {i} did not answer within {within:?}");
                }
                match tokio::time::timeout(left.min(Duration::from_millis(100)), self.workers[i].events.recv()).await {
                    Ok(Some(e)) => {
                        out.push(e);
                        break;
                    }
                    Ok(None) => {
                        let status = self.workers[i].child.try_wait().ok().flatten();
                        bail!("worker {i} exited ({status:?})");
                    }
                    Err(_) => tick(&self.total()),
                }
            }
        }
        Ok(out)
    }

    /// Waits until every worker finished connecting; returns the longest
    /// worker connect time, milliseconds.
    pub async fn connected(&mut self, within: Duration, tick: impl FnMut(&Progress)) -> anyhow::Result<u64> {
        let events = self.each_next(within, tick).await?;
        let mut ms = 0;
        for e in events {
            match e {
                Event::Connected { connect_ms, .. } => ms = ms.max(connect_ms),
                other => bail!("expected `connected`, got {other:?}"),
            }
        }
        Ok(ms)
    }

    /// Sends a command and waits for every worker's answer.
    pub async fn command(
        &mut self,
        cmd: Command,
        within: Duration,
        tick: impl FnMut(&Progress),
    ) -> anyhow::Result<Vec<Event>> {
        self.send(&cmd).await?;
        self.each_next(within, tick).await
    }

    /// Collects every worker's report.
    pub async fn reports(&mut self) -> anyhow::Result<Vec<WorkerReport>> {
        let events = self.command(Command::Report, Duration::from_secs(60), |_| {}).await?;
        events
            .into_iter()
            .map(|e| match e {
                Event::Report(r) => Ok(*r),
                other => bail!("expected a report, got {other:?}"),
            })
            .collect()
    }

    /// Closes every socket and waits (bounded) for the workers to exit.
    pub async fn close(mut self) {
        let _ = self.send(&Command::Close).await;
        for w in &mut self.workers {
            if tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await.is_err() {
                let _ = w.child.kill().await;
            }
        }
    }
}
