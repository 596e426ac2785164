//! Redis: each `redis: true` service's DB index, allocated in Redis itself.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Endpoint, err};
use crate::AgentError;

/// `REDIS_URL` for DB `index` of `ep`. A password goes with the user `default` (Redis 6's
/// name for the `requirepass` user): some clients (redis-cli 7.0) send an empty user name
/// as one and are refused.
pub fn redis_url(ep: &Endpoint, password: Option<&str>, index: u32) -> String {
    let auth = password
        .map(|p| format!("default:{p}@"))
        .unwrap_or_default();
    format!(
        "redis://{auth}{}:{}/{index}",
        ep.host,
        ep.port().unwrap_or(6379)
    )
}

/// Whether the Redis of `spec` asks for a password (`config: {"password": true}`; a
/// dedicated one always does): the agent makes one, the server requires it.
pub fn password_wanted(spec: &deploy_manifest::model::InfraService) -> bool {
    spec.redis_config().is_ok_and(|c| c.password == Some(true))
}

/// The hash in Redis's DB 0 that holds the DB index of every service: field = service
/// name, value = index. It lives beside the data it protects, so losing `state.json` cannot
/// hand one service's index to another.
pub const REDIS_INDEX_KEY: &str = "deployer:db-index";
/// The indexes given to services (DB 0 holds [`REDIS_INDEX_KEY`]).
pub const REDIS_INDEXES: std::ops::RangeInclusive<u32> = 1..=15;
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// Decide `service`'s index from what Redis holds (`in_redis`, which wins) and the copy in
/// `state.json` (`known`): an assignment only the state knows (made by an older agent) is
/// written to Redis first, unless Redis already gives that index to another service; a
/// service without one gets the lowest index neither holds. Returns the index and the
/// assignments to write.
pub fn assign_redis_index(
    service: &str,
    in_redis: &BTreeMap<String, u32>,
    known: &BTreeMap<String, u32>,
) -> Result<(u32, Vec<(String, u32)>), String> {
    let mut used: std::collections::BTreeSet<u32> = in_redis.values().copied().collect();
    let mut writes = Vec::new();
    for (name, &i) in known {
        if !in_redis.contains_key(name) && REDIS_INDEXES.contains(&i) && used.insert(i) {
            writes.push((name.clone(), i));
        }
    }
    if let Some(&i) = in_redis.get(service) {
        return Ok((i, writes));
    }
    if let Some(&(_, i)) = writes.iter().find(|(n, _)| n == service) {
        return Ok((i, writes));
    }
    used.extend(known.values().copied());
    let i = REDIS_INDEXES.clone().find(|i| !used.contains(i)).ok_or_else(|| {
        format!(
            "all {} DB indexes are taken (removed services keep theirs; see HGETALL {REDIS_INDEX_KEY} in DB 0)",
            REDIS_INDEXES.count()
        )
    })?;
    writes.push((service.to_owned(), i));
    Ok((i, writes))
}

fn parse_index_hash(reply: crate::resp::Reply) -> Result<BTreeMap<String, u32>, String> {
    use crate::resp::Reply;
    let Reply::Array(Some(items)) = reply else {
        return Err(format!(
            "HGETALL {REDIS_INDEX_KEY} did not answer with an array"
        ));
    };
    let text = |r: &Reply| match r {
        Reply::Bulk(Some(b)) => String::from_utf8(b.clone()).ok(),
        _ => None,
    };
    let mut out = BTreeMap::new();
    for pair in items.chunks(2) {
        let (Some(field), Some(value)) = (pair.first().and_then(text), pair.get(1).and_then(text))
        else {
            return Err(format!(
                "HGETALL {REDIS_INDEX_KEY}: an odd or non-text answer"
            ));
        };
        let index = value
            .parse::<u32>()
            .ok()
            .filter(|i| REDIS_INDEXES.contains(i))
            .ok_or_else(|| {
                format!(
                    "{REDIS_INDEX_KEY} gives {field:?} the index {value:?}, not one of 1-15; fix it in DB 0 (HSET {REDIS_INDEX_KEY} {field} <index>)"
                )
            })?;
        out.insert(field, index);
    }
    Ok(out)
}

/// The Redis DB index of `service`, kept in Redis itself ([`REDIS_INDEX_KEY`] in DB 0), and
/// every assignment Redis holds (for the copy in `state.json`). Allocation is optimistic:
/// `WATCH` the hash, read it, and write with `HSETNX` inside `MULTI`/`EXEC`, which Redis
/// aborts if anyone changed the hash in between (then it is read again); so two writers
/// never give one index twice. Every connect, read and write has a timeout.
pub fn redis_index(
    ep: &Endpoint,
    password: Option<&str>,
    service: &str,
    known: &BTreeMap<String, u32>,
) -> Result<(u32, BTreeMap<String, u32>), AgentError> {
    use crate::resp::{Conn, Reply};
    let port = ep.port().unwrap_or(6379);
    let fail = |detail: String| err(&format!("{service}: redis index"), detail);
    let mut conn = Conn::connect(&ep.host, port, REDIS_TIMEOUT).map_err(|e| fail(e.to_string()))?;
    let mut call = |args: &[&str]| conn.call(args).map_err(|e| fail(e.to_string()));
    if let Some(p) = password {
        call(&["AUTH", p])?;
    }
    for _ in 0..10 {
        call(&["WATCH", REDIS_INDEX_KEY])?;
        let mut in_redis = parse_index_hash(call(&["HGETALL", REDIS_INDEX_KEY])?).map_err(fail)?;
        let (index, writes) = assign_redis_index(service, &in_redis, known).map_err(fail)?;
        if writes.is_empty() {
            call(&["UNWATCH"])?;
            return Ok((index, in_redis));
        }
        call(&["MULTI"])?;
        for (name, i) in &writes {
            call(&["HSETNX", REDIS_INDEX_KEY, name, &i.to_string()])?;
        }
        match call(&["EXEC"])? {
            // Someone changed the hash meanwhile: read it again.
            Reply::Array(None) => continue,
            Reply::Array(Some(results)) if results.iter().all(|r| *r == Reply::Int(1)) => {
                for (name, i) in writes {
                    tracing::info!(service = %name, index = i, "Redis DB index recorded in {REDIS_INDEX_KEY}");
                    in_redis.insert(name, i);
                }
                return Ok((index, in_redis));
            }
            // A field appeared although the hash was watched (it cannot, but then the
            // next round reads what is there).
            Reply::Array(Some(_)) => continue,
            other => return Err(fail(format!("EXEC answered {other:?}"))),
        }
    }
    Err(fail(format!(
        "{REDIS_INDEX_KEY} kept changing while this agent allocated an index; the next run retries"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_indexes_come_from_redis_first() {
        let map = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(n, i)| (n.to_string(), *i)).collect()
        };
        // Redis knows: its answer, whatever the state says.
        assert_eq!(
            assign_redis_index(
                "a",
                &map(&[("a", 1), ("b", 2)]),
                &map(&[("a", 2), ("b", 1)])
            ),
            Ok((1, vec![]))
        );
        // State lost: Redis still knows.
        assert_eq!(
            assign_redis_index("b", &map(&[("a", 1), ("b", 2)]), &map(&[])),
            Ok((2, vec![]))
        );
        // An older agent's assignments (state only) go to Redis first.
        assert_eq!(
            assign_redis_index("b", &map(&[]), &map(&[("a", 1), ("b", 2)])),
            Ok((2, vec![("a".into(), 1), ("b".into(), 2)]))
        );
        // New: the lowest index nobody holds (removed services keep theirs).
        assert_eq!(
            assign_redis_index("c", &map(&[("a", 1)]), &map(&[("gone", 2)])),
            Ok((3, vec![("gone".into(), 2), ("c".into(), 3)]))
        );
        // The state's copy disagrees with Redis: Redis wins, the clash is not written.
        assert_eq!(
            assign_redis_index("c", &map(&[("a", 1)]), &map(&[("x", 1)])),
            Ok((2, vec![("c".into(), 2)]))
        );
        let full: BTreeMap<String, u32> = (1..=15).map(|i| (format!("s{i}"), i)).collect();
        assert!(
            assign_redis_index("new", &full, &map(&[]))
                .unwrap_err()
                .contains("taken")
        );
    }

    #[test]
    fn the_index_hash_is_read_strictly() {
        use crate::resp::Reply;
        let bulk = |s: &str| Reply::Bulk(Some(s.as_bytes().to_vec()));
        assert_eq!(
            parse_index_hash(Reply::Array(Some(vec![bulk("a"), bulk("3")]))),
            Ok([("a".to_owned(), 3)].into())
        );
        for bad in [
            vec![bulk("a"), bulk("0")],
            vec![bulk("a"), bulk("16")],
            vec![bulk("a")],
            vec![bulk("a"), bulk("x")],
        ] {
            assert!(
                parse_index_hash(Reply::Array(Some(bad.clone()))).is_err(),
                "{bad:?}"
            );
        }
    }
}
