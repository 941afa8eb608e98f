//! Names: identifier rules, NATS subjects and Redis keys, in one place so the
//! edge, the router and the tools can never disagree.

/// Longest identifier accepted (company, agent, user, admin, chat).
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` is 1–128 characters of `[A-Za-z0-9_-]` (safe as a NATS
/// subject token and a Redis key part).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Subjects prefix of every event.
pub const SUBJECT_ROOT: &str = "websocket";
/// Subjects the stream holds.
pub const STREAM_SUBJECTS: &str = "websocket.>";

/// `websocket.{company}.{agent}.chats`
pub fn chats_subject(company: &str, agent: &str) -> String {
    format!("{SUBJECT_ROOT}.{company}.{agent}.chats")
}

/// `websocket.{company}.{agent}.messages.{chat}`
pub fn messages_subject(company: &str, agent: &str, chat: &str) -> String {
    format!("{SUBJECT_ROOT}.{company}.{agent}.messages.{chat}")
}

/// `websocket.{company}.{agent}.agents`
pub fn agents_subject(company: &str, agent: &str) -> String {
    format!("{SUBJECT_ROOT}.{company}.{agent}.agents")
}

/// A parsed event subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject<'a> {
    Chats { company: &'a str, agent: &'a str },
    Messages { company: &'a str, agent: &'a str, chat: &'a str },
    Agents { company: &'a str, agent: &'a str },
}

impl<'a> Subject<'a> {
    /// Parses a subject of one of the three known shapes with valid identifiers.
    pub fn parse(subject: &'a str) -> Option<Self> {
        let mut parts = subject.split('.');
        if parts.next()? != SUBJECT_ROOT {
            return None;
        }
        let company = parts.next().filter(|s| valid_id(s))?;
        let agent = parts.next().filter(|s| valid_id(s))?;
        let parsed = match parts.next()? {
            "chats" => Subject::Chats { company, agent },
            "agents" => Subject::Agents { company, agent },
            "messages" => Subject::Messages { company, agent, chat: parts.next().filter(|s| valid_id(s))? },
            _ => return None,
        };
        parts.next().is_none().then_some(parsed)
    }

    /// The Redis route key the router reads for this subject. Admin subjects
    /// have several keys ([`admin_route_keys`]).
    pub fn route_key(&self) -> Option<String> {
        match self {
            Subject::Chats { company, agent } => Some(chats_route_key(company, agent)),
            Subject::Messages { company, agent, chat } => Some(messages_route_key(company, agent, chat)),
            Subject::Agents { .. } => None,
        }
    }
}

/// `session:{company}:{agent}:{user}`
pub fn user_session_key(company: &str, agent: &str, user: &str) -> String {
    format!("session:{company}:{agent}:{user}")
}

/// `session:admin:{admin_id}`
pub fn admin_session_key(admin: &str) -> String {
    format!("session:admin:{admin}")
}

/// `edge:{pod_id}`: the edge's registration (hash: `addr`, `boot`, `gen`,
/// `canary`), refreshed with a TTL.
pub fn edge_key(pod_id: &str) -> String {
    format!("edge:{pod_id}")
}

/// `route:{company}:{agent}:chats`
pub fn chats_route_key(company: &str, agent: &str) -> String {
    format!("route:{company}:{agent}:chats")
}

/// `route:{company}:{agent}:messages:{chat}`
pub fn messages_route_key(company: &str, agent: &str, chat: &str) -> String {
    format!("route:{company}:{agent}:messages:{chat}")
}

/// Admin route keys. An admin socket's token narrows it to one of four
/// scopes; the edge records itself under the key of that scope, and the
/// router reads all (at most) four keys that could match a subject:
/// `route:admin:*`, `route:admin:{c}:*`, `route:admin:*:{a}`, `route:admin:{c}:{a}`.
pub fn admin_route_key(company: Option<&str>, agent: Option<&str>) -> String {
    format!("route:admin:{}:{}", company.unwrap_or("*"), agent.unwrap_or("*"))
}

/// Every admin route key that may hold edges wanting `websocket.{c}.{a}.agents`.
pub fn admin_route_keys(company: &str, agent: &str) -> [String; 4] {
    [
        admin_route_key(None, None),
        admin_route_key(Some(company), None),
        admin_route_key(None, Some(agent)),
        admin_route_key(Some(company), Some(agent)),
    ]
}

/// Pub/sub channel of session kill requests.
pub const KILL_SWITCH_CHANNEL: &str = "dws:kill_switch";
/// Pub/sub channel on which edges announce route changes (routers drop caches).
pub const ROUTE_CHANGES_CHANNEL: &str = "dws:route_changes";
/// Longest a router reuses a route resolution without asking Redis again
/// (announcements on [`ROUTE_CHANGES_CHANNEL`] drop it sooner). A route
/// written now is seen by every router's resolution at the latest this long
/// after: the edge's resume waits it out before taking its cut.
pub const ROUTE_CACHE_TTL: std::time::Duration = std::time::Duration::from_millis(500);
/// Pub/sub channel on which an edge announces a released session lock
/// (payload: the lock key), so a waiting takeover retries at once.
pub const SESSION_RELEASED_CHANNEL: &str = "dws:session_released";
/// Key holding the route registry generation (see decision 0014).
pub const REGISTRY_GENERATION_KEY: &str = "dws:registry:generation";
/// Hash of every edge that registered (pod id → gRPC address, `-` once it
/// left gracefully). Entries are removed only when a router confirmed the
/// edge's death, never by a TTL.
pub const EDGE_DIRECTORY_KEY: &str = "dws:edges";

/// Where the keys live: the names above are the logical names every part of
/// the product uses (hubs, caches, route-change announcements, SPEC §6–7).
/// A `KeyLayout` turns them into the names stored in Redis. Standalone keeps
/// them exactly; a Redis Cluster gets hash tags so that every script touches
/// one slot (decision 0027):
///
/// | logical | cluster |
/// |---|---|
/// | `route:{c}:{a}:chats`, `route:{c}:{a}:messages:{chat}` | `route:{c:a}:chats`, `route:{c:a}:messages:{chat}` |
/// | `route:admin:{c or *}:{a or *}` | `route:{admin}:{c or *}:{a or *}` |
/// | `edge:{pod}`, `dws:edges`, `dws:registry:generation` | `{dws}:edge:{pod}`, `{dws}:edges`, `{dws}:registry:generation` |
/// | `session:…` | unchanged (single-key commands only) |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyLayout {
    /// One Redis: the SPEC's names, unchanged.
    #[default]
    Standalone,
    /// Redis Cluster: hash-tagged names.
    Cluster,
}

/// The hash tag of every registry key in cluster mode (one slot).
const REGISTRY_TAG: &str = "{dws}";

impl KeyLayout {
    /// Whether keys are spread over the slots of a Redis Cluster.
    pub fn is_cluster(self) -> bool {
        self == KeyLayout::Cluster
    }

    /// The stored name of a logical route key.
    pub fn route(self, logical: &str) -> String {
        if !self.is_cluster() {
            return logical.to_string();
        }
        let Some(rest) = logical.strip_prefix("route:") else { return logical.to_string() };
        if let Some(scope) = rest.strip_prefix("admin:") {
            return format!("route:{{admin}}:{scope}");
        }
        let mut parts = rest.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(c), Some(a), Some(tail)) => format!("route:{{{c}:{a}}}:{tail}"),
            _ => logical.to_string(),
        }
    }

    /// The registration of edge `pod` ([`edge_key`]).
    pub fn edge(self, pod: &str) -> String {
        match self {
            KeyLayout::Standalone => edge_key(pod),
            KeyLayout::Cluster => format!("{REGISTRY_TAG}:{}", edge_key(pod)),
        }
    }

    /// The edge directory ([`EDGE_DIRECTORY_KEY`]).
    pub fn directory(self) -> &'static str {
        match self {
            KeyLayout::Standalone => EDGE_DIRECTORY_KEY,
            KeyLayout::Cluster => "{dws}:edges",
        }
    }

    /// The registry generation marker ([`REGISTRY_GENERATION_KEY`]).
    pub fn generation(self) -> &'static str {
        match self {
            KeyLayout::Standalone => REGISTRY_GENERATION_KEY,
            KeyLayout::Cluster => "{dws}:registry:generation",
        }
    }

    /// Splits `items` into groups whose stored keys share one hash slot
    /// (one group in standalone): each group can be one script call or one
    /// pipeline. Order within a group is kept.
    pub fn by_slot<T>(self, items: Vec<T>, key: impl Fn(&T) -> &str) -> Vec<Vec<T>> {
        if !self.is_cluster() {
            return if items.is_empty() { Vec::new() } else { vec![items] };
        }
        let mut groups: Vec<(redis::cluster_routing::Slot, Vec<T>)> = Vec::new();
        let mut index: std::collections::HashMap<redis::cluster_routing::Slot, usize> =
            std::collections::HashMap::new();
        for item in items {
            let slot = hash_slot(key(&item));
            match index.get(&slot) {
                Some(&i) => groups[i].1.push(item),
                None => {
                    index.insert(slot, groups.len());
                    groups.push((slot, vec![item]));
                }
            }
        }
        groups.into_iter().map(|(_, g)| g).collect()
    }
}

/// The Redis Cluster hash slot of a stored key (CRC16 of its hash tag, as
/// the server and redis-rs compute it).
pub fn hash_slot(key: &str) -> redis::cluster_routing::Slot {
    redis::cluster_routing::Slot::for_key(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(valid_id("abc-DEF_123"));
        assert!(valid_id(&"a".repeat(128)));
        for bad in ["", "a.b", "a b", "a*", "a>", "ä", "a:b", &"a".repeat(129)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn subjects_round_trip() {
        assert_eq!(Subject::parse(&chats_subject("c", "a")), Some(Subject::Chats { company: "c", agent: "a" }));
        assert_eq!(
            Subject::parse(&messages_subject("c", "a", "x")),
            Some(Subject::Messages { company: "c", agent: "a", chat: "x" })
        );
        assert_eq!(Subject::parse(&agents_subject("c", "a")), Some(Subject::Agents { company: "c", agent: "a" }));
        for bad in [
            "websocket.c.a",
            "websocket.c.a.chats.x",
            "other.c.a.chats",
            "websocket.c.a.messages",
            "websocket.c.a.foo",
            "websocket..a.chats",
        ] {
            assert_eq!(Subject::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn admin_keys_cover_every_scope() {
        let keys = admin_route_keys("c1", "a1");
        for scope in [(None, None), (Some("c1"), None), (None, Some("a1")), (Some("c1"), Some("a1"))] {
            assert!(keys.contains(&admin_route_key(scope.0, scope.1)));
        }
    }

    #[test]
    fn standalone_keeps_the_spec_names() {
        let l = KeyLayout::Standalone;
        assert_eq!(l.route(&chats_route_key("c", "a")), "route:c:a:chats");
        assert_eq!(l.edge("p1"), "edge:p1");
        assert_eq!(l.directory(), EDGE_DIRECTORY_KEY);
        assert_eq!(l.generation(), REGISTRY_GENERATION_KEY);
        assert_eq!(l.by_slot(vec!["route:a:b:chats", "route:x:y:chats"], |k| k).len(), 1);
    }

    #[test]
    fn cluster_tags_put_each_script_in_one_slot() {
        let l = KeyLayout::Cluster;
        assert_eq!(l.route(&chats_route_key("c", "a")), "route:{c:a}:chats");
        assert_eq!(l.route(&messages_route_key("c", "a", "x")), "route:{c:a}:messages:x");
        assert_eq!(l.route(&admin_route_key(Some("c"), None)), "route:{admin}:c:*");
        // One (company, agent): one slot; its admin keys: one slot.
        let slot = hash_slot(&l.route(&chats_route_key("c", "a")));
        assert_eq!(hash_slot(&l.route(&messages_route_key("c", "a", "zz"))), slot);
        let admin: Vec<_> = admin_route_keys("c", "a").iter().map(|k| hash_slot(&l.route(k))).collect();
        assert!(admin.iter().all(|s| *s == admin[0]));
        // The registry: one slot, whatever the pod id.
        let reg = hash_slot(l.directory());
        for key in [l.generation().to_string(), l.edge("p1"), l.edge("weird{pod}")] {
            assert_eq!(hash_slot(&key), reg, "{key}");
        }
        // Known values (redis-cli CLUSTER KEYSLOT): the tag alone is hashed.
        let foo = redis::cluster_routing::Slot::new(12182);
        assert_eq!(Some(hash_slot("foo")), foo);
        assert_eq!(Some(hash_slot("{foo}:bar")), foo);
        let keys: Vec<String> = (0..50).map(|i| l.route(&chats_route_key(&format!("c{i}"), "a"))).collect();
        let groups = l.by_slot(keys.clone(), |k| k);
        assert!(groups.len() > 1);
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), keys.len());
        for g in &groups {
            assert!(g.iter().all(|k| hash_slot(k) == hash_slot(&g[0])));
        }
    }
}
