//! Command-line flags of `daisi-dev-stack`. Every port is a free one unless a
//! flag names it.

use std::path::PathBuf;
use std::time::Duration;

use daisi_common::names::valid_id;

/// Environment variable naming the folder holding `daisi-edge` and
/// `daisi-router` (default: the folder of `daisi-dev-stack` itself).
pub const ENV_BIN_DIR: &str = "DAISI_DEV_BIN_DIR";

/// What to start and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub nats_port: Option<u16>,
    pub redis_port: Option<u16>,
    pub router_port: Option<u16>,
    /// HTTP ports of the edges, in order; edges without one get a free port.
    pub edge_ports: Vec<u16>,
    pub edges: usize,
    pub bin_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub company: String,
    pub agent: String,
    pub user: String,
    pub publisher: bool,
    pub publish_interval: Duration,
    pub ready_timeout: Duration,
    /// A three-node NATS cluster (stream with three replicas) and a six-node
    /// Redis Cluster instead of one server each.
    pub cluster: bool,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            nats_port: None,
            redis_port: None,
            router_port: None,
            edge_ports: Vec::new(),
            edges: 2,
            bin_dir: None,
            config: None,
            company: "demo".into(),
            agent: "agent1".into(),
            user: "u1".into(),
            publisher: true,
            cluster: false,
            publish_interval: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(60),
        }
    }
}

/// One event to publish by hand (`daisi-dev-stack publish`).
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub nats_url: String,
    pub subject: String,
    /// The message body, already checked to be JSON.
    pub payload: String,
}

/// The outcome of parsing.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    Run(Args),
    Publish(Publish),
    Help,
    PublishHelp,
}

/// Usage text.
pub const USAGE: &str = "\
usage: daisi-dev-stack [options]

Starts nats-server -js, redis-server, one daisi-router and two daisi-edge
processes on 127.0.0.1 with fresh dev secrets, prints a demo URL, and publishes
sample events until Ctrl-C, which stops everything.

options:
  --nats-port PORT            NATS client port (default: a free port)
  --redis-port PORT           Redis port (default: a free port)
  --router-port PORT          router HTTP port for /health /ready /metrics (default: free)
  --edge-port PORT            HTTP port of the next edge; repeat for each edge (default: free)
  --edges N                   number of edges, 1-8 (default 2)
  --bin-dir DIR               folder with daisi-edge and daisi-router
                              (default: $DAISI_DEV_BIN_DIR, else this binary's folder)
  --config PATH               config file passed as DAISI_WS_CONFIG (default: config/config.yaml)
  --company ID --agent ID --user ID
                              identity of the demo token (default demo / agent1 / u1)
  --publish-interval-ms MS    sample event period (default 1000)
  --no-publisher              do not publish sample events
  --cluster                   three nats-server processes in a JetStream cluster (stream with
                              3 replicas; --nats-port is the first one's) and a Redis Cluster
                              of three masters and three replicas (redis.mode cluster;
                              --redis-port is the first node's)
  --ready-timeout-secs S      how long to wait for every /ready (default 60)
  -h, --help                  this text

usage: daisi-dev-stack publish --nats-url URL SUBJECT JSON
  publishes one event to the running stack's JetStream (the banner prints the
  command with its NATS URL) and prints its stream sequence; see `publish --help`.";

/// Usage text of `publish`.
pub const PUBLISH_USAGE: &str = "\
usage: daisi-dev-stack publish --nats-url URL SUBJECT JSON

Publishes one event to JetStream, as the platform would, and prints its stream
sequence (the `seq` that sockets see). The dev stack's banner prints this
command with its NATS URL filled in.

  --nats-url URL   the stack's NATS (its NATS_URL= line)
  SUBJECT          websocket.{company}.{agent}.chats
                   websocket.{company}.{agent}.messages.{chat_id}
                   websocket.{company}.{agent}.agents
  JSON             the message body; must be JSON

example:
  daisi-dev-stack publish --nats-url nats://127.0.0.1:4222 websocket.demo.agent1.chats '{\"text\":\"hello\"}'";

/// Parses the arguments of `publish` (after the word `publish`).
fn parse_publish(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut nats_url = None;
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(raw) = it.next() {
        match raw.as_str() {
            "-h" | "--help" => return Ok(Parsed::PublishHelp),
            "--nats-url" => nats_url = Some(it.next().ok_or("--nats-url needs a value")?),
            s if s.starts_with("--nats-url=") => nats_url = Some(s["--nats-url=".len()..].to_string()),
            s if s.starts_with("--") => return Err(format!("unknown argument `{s}` (try publish --help)")),
            _ => rest.push(raw),
        }
    }
    let nats_url = nats_url.ok_or("publish needs --nats-url URL (the stack prints it as NATS_URL=)")?;
    let [subject, payload]: [String; 2] =
        rest.try_into().map_err(|_| "publish needs SUBJECT and JSON (try publish --help)".to_string())?;
    if daisi_common::names::Subject::parse(&subject).is_none() {
        return Err(format!(
            "`{subject}` is not a product subject: websocket.{{company}}.{{agent}}.chats, \
             .messages.{{chat_id}} or .agents"
        ));
    }
    if serde_json::from_str::<serde_json::Value>(&payload).is_err() {
        return Err(format!("the payload must be JSON, got `{payload}`"));
    }
    Ok(Parsed::Publish(Publish { nats_url, subject, payload }))
}

/// Parses the arguments (without the program name).
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut out = Args::default();
    let mut it = args.into_iter().peekable();
    if it.peek().is_some_and(|a| a == "publish") {
        it.next();
        return parse_publish(it);
    }
    while let Some(raw) = it.next() {
        let (flag, inline) = match raw.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (raw.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it.next().ok_or_else(|| format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--nats-port" => out.nats_port = Some(port(&flag, &value(&flag)?)?),
            "--redis-port" => out.redis_port = Some(port(&flag, &value(&flag)?)?),
            "--router-port" => out.router_port = Some(port(&flag, &value(&flag)?)?),
            "--edge-port" => out.edge_ports.push(port(&flag, &value(&flag)?)?),
            "--edges" => {
                let v = value(&flag)?;
                out.edges =
                    v.parse().ok().filter(|n| (1..=8).contains(n)).ok_or(format!("--edges must be 1-8, got `{v}`"))?
            }
            "--bin-dir" => out.bin_dir = Some(PathBuf::from(value(&flag)?)),
            "--config" => out.config = Some(PathBuf::from(value(&flag)?)),
            "--company" => out.company = id(&flag, value(&flag)?)?,
            "--agent" => out.agent = id(&flag, value(&flag)?)?,
            "--user" => out.user = id(&flag, value(&flag)?)?,
            "--publish-interval-ms" => {
                let v = value(&flag)?;
                let ms: u64 = v.parse().ok().filter(|n| *n >= 10).ok_or(format!("{flag} must be >= 10, got `{v}`"))?;
                out.publish_interval = Duration::from_millis(ms);
            }
            "--no-publisher" => out.publisher = false,
            "--cluster" => out.cluster = true,
            "--ready-timeout-secs" => {
                let v = value(&flag)?;
                let s: u64 = v.parse().ok().filter(|n| *n >= 1).ok_or(format!("{flag} must be >= 1, got `{v}`"))?;
                out.ready_timeout = Duration::from_secs(s);
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    if out.edge_ports.len() > out.edges {
        return Err(format!("{} --edge-port flags for {} edges (see --edges)", out.edge_ports.len(), out.edges));
    }
    if out.bin_dir.is_none() {
        out.bin_dir = std::env::var_os(ENV_BIN_DIR).filter(|v| !v.is_empty()).map(PathBuf::from);
    }
    Ok(Parsed::Run(out))
}

fn port(flag: &str, v: &str) -> Result<u16, String> {
    v.parse().ok().filter(|p| *p != 0).ok_or(format!("{flag} must be a port 1-65535, got `{v}`"))
}

fn id(flag: &str, v: String) -> Result<String, String> {
    if valid_id(&v) { Ok(v) } else { Err(format!("{flag} must be 1-128 characters of [A-Za-z0-9_-], got `{v}`")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Args, String> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Parsed::Run(a) => Ok(a),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn defaults_and_flags() {
        let a = run(&[]).unwrap();
        assert_eq!((a.edges, a.company.as_str(), a.publisher), (2, "demo", true));
        let a = run(&["--nats-port", "4222", "--edge-port=8080", "--edge-port", "8081", "--no-publisher"]).unwrap();
        assert_eq!(a.nats_port, Some(4222));
        assert_eq!(a.edge_ports, vec![8080, 8081]);
        assert!(!a.publisher);
        assert_eq!(run(&["--publish-interval-ms", "200"]).unwrap().publish_interval, Duration::from_millis(200));
        assert_eq!(parse(["--help".to_string()]).unwrap(), Parsed::Help);
    }

    #[test]
    fn publish_checks_subject_and_json() {
        let p = |args: &[&str]| parse(args.iter().map(|s| s.to_string()));
        assert_eq!(
            p(&["publish", "--nats-url", "nats://127.0.0.1:1", "websocket.demo.agent1.chats", r#"{"a":1}"#]).unwrap(),
            Parsed::Publish(Publish {
                nats_url: "nats://127.0.0.1:1".into(),
                subject: "websocket.demo.agent1.chats".into(),
                payload: r#"{"a":1}"#.into()
            })
        );
        assert_eq!(p(&["publish", "--help"]).unwrap(), Parsed::PublishHelp);
        for (args, needle) in [
            (&["publish", "websocket.demo.agent1.chats", "{}"][..], "--nats-url"),
            (&["publish", "--nats-url", "n", "websocket.demo.agent1.chats"][..], "SUBJECT and JSON"),
            (&["publish", "--nats-url", "n", "other.subject", "{}"][..], "not a product subject"),
            (&["publish", "--nats-url", "n", "websocket.demo.agent1.chats", "hello"][..], "JSON"),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn bad_flags_name_themselves() {
        for (args, needle) in [
            (&["--nats-port", "x"][..], "--nats-port"),
            (&["--edges", "0"][..], "--edges"),
            (&["--edges", "1", "--edge-port", "1", "--edge-port", "2"][..], "--edges"),
            (&["--company", "a.b"][..], "--company"),
            (&["--bogus"][..], "--bogus"),
            (&["--redis-port"][..], "--redis-port"),
        ] {
            let e = run(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
}
