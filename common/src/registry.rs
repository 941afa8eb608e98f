//! Reads of the edge registry (directory, registrations, generation
//! marker) shared by the edge, the router and the tests. The scripts name
//! every key they touch, so the directory's pods are read first; all these
//! keys share one hash slot in cluster mode (decision 0027).

use redis::Script;

use crate::deps::RedisConn;
use crate::names::KeyLayout;
use crate::scripts;

/// One edge of the directory as one read saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub pod: String,
    /// The directory's value: the gRPC address, or `-{time}` after a graceful shutdown.
    pub dir_addr: String,
    /// Its registration exists.
    pub registered: bool,
    /// The registration's address ("" if none).
    pub reg_addr: String,
    /// The generation it confirmed ("" if none).
    pub generation: String,
    /// Its canary state ("" if unknown).
    pub canary: String,
}

/// A whole read of the directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectoryRead {
    /// The registry generation ("" = missing).
    pub marker: String,
    pub entries: Vec<DirectoryEntry>,
}

/// How often a read is repeated when edges joined the directory between
/// reading its pods and running the script.
const ATTEMPTS: usize = 4;

fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::VerbatimString { text, .. } => text.clone(),
        redis::Value::Int(n) => n.to_string(),
        _ => String::new(),
    }
}

/// Reads the directory with every registration ([`scripts::READ_DIRECTORY`]).
pub async fn read_directory(conn: &mut RedisConn, keys: KeyLayout) -> Result<DirectoryRead, redis::RedisError> {
    let script = Script::new(scripts::READ_DIRECTORY);
    let mut pods: Vec<String> = redis::cmd("HKEYS").arg(keys.directory()).query_async(conn).await?;
    for _ in 0..ATTEMPTS {
        let mut inv = script.prepare_invoke();
        inv.key(keys.directory()).key(keys.generation());
        for pod in &pods {
            inv.key(keys.edge(pod)).arg(pod);
        }
        let raw: redis::Value = inv.invoke_async(conn).await?;
        let (read, missing) = parse_directory(raw)?;
        if missing.is_empty() {
            return Ok(read);
        }
        pods.extend(missing);
    }
    Err(redis::RedisError::from((redis::ErrorKind::Io, "the edge directory kept changing while read")))
}

fn parse_directory(raw: redis::Value) -> Result<(DirectoryRead, Vec<String>), redis::RedisError> {
    let bad = || redis::RedisError::from((redis::ErrorKind::Parse, "unexpected reply from READ_DIRECTORY"));
    let redis::Value::Array(items) = raw else { return Err(bad()) };
    let [marker, redis::Value::Array(flat), redis::Value::Array(missing)] =
        <[redis::Value; 3]>::try_from(items).map_err(|_| bad())?
    else {
        return Err(bad());
    };
    let entries = flat
        .chunks_exact(6)
        .map(|c| DirectoryEntry {
            pod: text(&c[0]),
            dir_addr: text(&c[1]),
            registered: text(&c[2]) == "1",
            reg_addr: text(&c[3]),
            generation: text(&c[4]),
            canary: text(&c[5]),
        })
        .filter(|e| !e.pod.is_empty())
        .collect();
    Ok((DirectoryRead { marker: text(&marker), entries }, missing.iter().map(text).collect()))
}

/// Whether the registry is complete: the marker exists and every registered
/// edge confirmed it ([`scripts::REGISTRY_CONFIRMED`]).
pub async fn registry_confirmed(conn: &mut RedisConn, keys: KeyLayout) -> Result<bool, redis::RedisError> {
    let script = Script::new(scripts::REGISTRY_CONFIRMED);
    for _ in 0..ATTEMPTS {
        let pods: Vec<String> = redis::cmd("HKEYS").arg(keys.directory()).query_async(conn).await?;
        let mut inv = script.prepare_invoke();
        inv.key(keys.generation()).key(keys.directory());
        for pod in &pods {
            inv.key(keys.edge(pod)).arg(pod);
        }
        match inv.invoke_async::<i64>(conn).await? {
            -1 => continue,
            n => return Ok(n == 1),
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_entries_and_missing_pods() {
        let raw = Value::Array(vec![
            b("gen-1"),
            Value::Array(vec![
                b("e1"),
                b("10.0.0.1:1"),
                Value::Int(1),
                b("10.0.0.1:1"),
                b("gen-1"),
                b("ok"),
                b("e2"),
                b("-1234"),
                Value::Int(0),
                b(""),
                b(""),
                b(""),
            ]),
            Value::Array(vec![b("e3")]),
        ]);
        let (read, missing) = parse_directory(raw).unwrap();
        assert_eq!(read.marker, "gen-1");
        assert_eq!(read.entries.len(), 2);
        assert_eq!(
            read.entries[0],
            DirectoryEntry {
                pod: "e1".into(),
                dir_addr: "10.0.0.1:1".into(),
                registered: true,
                reg_addr: "10.0.0.1:1".into(),
                generation: "gen-1".into(),
                canary: "ok".into(),
            }
        );
        assert!(!read.entries[1].registered);
        assert_eq!(read.entries[1].dir_addr, "-1234");
        assert_eq!(missing, vec!["e3".to_string()]);
        assert!(parse_directory(Value::Int(1)).is_err());
    }
}
