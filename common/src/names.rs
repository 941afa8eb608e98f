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
}
