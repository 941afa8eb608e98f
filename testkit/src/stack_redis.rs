//! The Redis an integration test's stack runs on: one `redis-server`
//! (the default) or a Redis Cluster of three masters and three replicas,
//! chosen for the whole run by `DWS_TEST_REDIS=standalone|cluster`
//! (decision 0031). Tests obtain their Redis, their configuration
//! ([`crate::test_config`]), their own connection and the stored key names
//! from here, so the same test runs in both modes.

use daisi_common::config::{Config, RedisConfig, RedisMode};
use daisi_common::deps::RedisConn;
use daisi_common::names::KeyLayout;

use crate::RedisServer;
use crate::cluster::RedisCluster;

/// The environment variable that selects the Redis of every test stack.
pub const REDIS_MODE_ENV: &str = "DWS_TEST_REDIS";

/// The `redis.mode` this test run's stacks use: `DWS_TEST_REDIS` unset,
/// empty or `standalone` is standalone, `cluster` is a Redis Cluster.
/// Any other value panics (a typo must not quietly test standalone).
pub fn redis_mode() -> RedisMode {
    match std::env::var(REDIS_MODE_ENV).unwrap_or_default().trim() {
        "" | "standalone" => RedisMode::Standalone,
        "cluster" => RedisMode::Cluster,
        other => panic!("{REDIS_MODE_ENV}={other:?}: expected `standalone` or `cluster`"),
    }
}

/// Skips the rest of a test that is about one standalone Redis process when
/// the run is in cluster mode: prints why (visible with `--nocapture`, and
/// in nextest's output of the test) and returns `true`; the caller returns.
pub fn skip_in_cluster_mode(test: &str, reason: &str) -> bool {
    if redis_mode() != RedisMode::Cluster {
        return false;
    }
    eprintln!("SKIPPED in cluster mode ({REDIS_MODE_ENV}=cluster): {test}: {reason}");
    true
}

enum Inner {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

/// A test stack's Redis, in the mode of [`redis_mode`]. Kill, restart,
/// freeze and thaw act on the whole Redis: the one server, or every node of
/// the cluster. In cluster mode, dropping it fails the test if any command
/// was refused for crossing hash slots (by any node, or as counted by this
/// process's product code): a CROSSSLOT is a key layout bug.
pub struct TestRedis {
    inner: Inner,
    /// CROSSSLOT refusals counted by nodes before they were killed (their
    /// `INFO errorstats` starts over with the process).
    refused_before_restart: u64,
}

impl TestRedis {
    /// Starts a Redis in this run's mode ([`redis_mode`]).
    pub fn start() -> Self {
        Self::start_in(redis_mode())
    }

    /// Starts a Redis in `mode`, whatever the environment says.
    pub fn start_in(mode: RedisMode) -> Self {
        let inner = match mode {
            RedisMode::Standalone => Inner::Standalone(RedisServer::start()),
            RedisMode::Cluster => Inner::Cluster(RedisCluster::start()),
        };
        Self { inner, refused_before_restart: 0 }
    }

    pub fn mode(&self) -> RedisMode {
        match self.inner {
            Inner::Standalone(_) => RedisMode::Standalone,
            Inner::Cluster(_) => RedisMode::Cluster,
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.mode() == RedisMode::Cluster
    }

    /// The stored key names of this mode: tests that read or write keys
    /// directly name them through it (`keys().route("route:c1:a1:chats")`).
    pub fn keys(&self) -> KeyLayout {
        match self.mode() {
            RedisMode::Standalone => KeyLayout::Standalone,
            RedisMode::Cluster => KeyLayout::Cluster,
        }
    }

    /// `redis.address`: `127.0.0.1:<port>`, or every node's, comma-separated.
    pub fn address(&self) -> String {
        match &self.inner {
            Inner::Standalone(r) => r.address(),
            Inner::Cluster(c) => c.addresses(),
        }
    }

    /// The `redis` section of a test configuration for this Redis.
    pub fn redis_config(&self) -> RedisConfig {
        RedisConfig { address: self.address(), mode: self.mode(), ..RedisConfig::default() }
    }

    /// Points `config` at this Redis (`redis.address` and `redis.mode`).
    pub fn configure(&self, config: &mut Config) {
        config.redis.address = self.address();
        config.redis.mode = self.mode();
    }

    /// A connection of the test's own, through the product's client in this
    /// mode (commands go to the node owning their key's slot). Lazy: it
    /// connects on its first command.
    pub async fn conn(&self) -> RedisConn {
        daisi_common::deps::redis(&self.redis_config()).expect("test Redis connection").conn
    }

    /// The one server in standalone mode.
    pub fn standalone(&self) -> Option<&RedisServer> {
        match &self.inner {
            Inner::Standalone(r) => Some(r),
            Inner::Cluster(_) => None,
        }
    }

    /// The cluster in cluster mode.
    pub fn cluster(&self) -> Option<&RedisCluster> {
        match &self.inner {
            Inner::Standalone(_) => None,
            Inner::Cluster(c) => Some(c),
        }
    }

    /// SIGKILL: the server, or every node.
    pub fn kill(&mut self) {
        match &mut self.inner {
            Inner::Standalone(r) => r.kill(),
            Inner::Cluster(c) => {
                self.refused_before_restart += c.cross_slot_refusals();
                c.kill_all();
            }
        }
    }

    /// Starts again, empty (kills first what still runs): the server on its
    /// port, or every node with its slots and role; returns once a cluster
    /// is healthy again.
    pub fn restart(&mut self) {
        match &mut self.inner {
            Inner::Standalone(r) => r.restart(),
            Inner::Cluster(c) => {
                self.refused_before_restart += c.cross_slot_refusals();
                c.restart_all();
            }
        }
    }

    /// `FLUSHALL` on the server, or on every master (replicas follow): Redis
    /// loses its data without going down, so clients see no error and find
    /// out only from what is missing.
    pub fn flush_all(&self) {
        let ports = match &self.inner {
            Inner::Standalone(r) => vec![r.port()],
            Inner::Cluster(c) => c.master_ports(),
        };
        for port in ports {
            let reply = crate::cluster::redis_raw(port, "FLUSHALL");
            assert!(reply.starts_with("+OK"), "FLUSHALL on {port}: {reply:?}");
        }
    }

    /// SIGSTOP: the server, or every node (data kept, clocks moving on).
    pub fn freeze(&self) {
        match &self.inner {
            Inner::Standalone(r) => r.freeze(),
            Inner::Cluster(c) => c.freeze_all(),
        }
    }

    /// SIGCONT after [`TestRedis::freeze`].
    pub fn thaw(&self) {
        match &self.inner {
            Inner::Standalone(r) => r.thaw(),
            Inner::Cluster(c) => c.thaw_all(),
        }
    }

    /// Commands refused for crossing slots so far: by the nodes (`INFO
    /// errorstats`, kept across restarts) and by this process's clients
    /// (`deps::cross_slot_errors`, which also counts scripts refused for
    /// touching a key of another node). Always 0 in standalone mode.
    pub fn cross_slot_refusals(&self) -> u64 {
        match &self.inner {
            Inner::Standalone(_) => 0,
            Inner::Cluster(c) => {
                self.refused_before_restart + c.cross_slot_refusals() + daisi_common::deps::cross_slot_errors()
            }
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        // A failing test already says why; a frozen node would only slow this down.
        if std::thread::panicking() || !self.is_cluster() {
            return;
        }
        let refused = self.cross_slot_refusals();
        assert_eq!(refused, 0, "{refused} Redis command(s) refused with CROSSSLOT during this test (a key layout bug)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::redis_raw;

    #[test]
    fn a_cross_slot_refusal_fails_the_test_at_teardown() {
        let redis = TestRedis::start_in(RedisMode::Cluster);
        assert_eq!(redis.keys(), KeyLayout::Cluster);
        assert_eq!(redis.address().split(',').count(), 6, "every node is a seed");
        let port = redis.cluster().expect("a cluster").master_ports()[0];
        // Two keys of different slots in one command.
        let reply = redis_raw(port, "MSET {a}x 1 {b}y 2");
        assert!(reply.starts_with("-CROSSSLOT"), "{reply}");
        assert!(redis.cross_slot_refusals() >= 1);
        let teardown = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(redis)));
        assert!(teardown.is_err(), "dropping a cluster that refused a command with CROSSSLOT must fail the test");
    }

    #[test]
    fn standalone_is_one_server_with_the_specs_key_names() {
        let redis = TestRedis::start_in(RedisMode::Standalone);
        assert_eq!(redis.keys(), KeyLayout::Standalone);
        assert!(redis.standalone().is_some() && !redis.address().contains(','));
        let mut config = Config::default();
        redis.configure(&mut config);
        assert_eq!((config.redis.mode, config.redis.address.as_str()), (RedisMode::Standalone, &*redis.address()));
    }
}
