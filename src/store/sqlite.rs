//! The embedded durable store: a journal of quota events in one SQLite file
//! (WAL mode, `synchronous = FULL` unless configured `NORMAL`), written by
//! one thread in group commits.
//!
//! Callers hand the writer a [`Job`] of events; the writer takes everything
//! queued, writes it in one transaction, commits (one fsync of the WAL for
//! the whole batch) and then answers every job that asked to know. While one
//! commit is on disk the next batch gathers, so under load many admissions
//! share one fsync and an idle gateway commits each at once: there is no
//! timer to wait for. Every row carries wall-clock UNIX nanoseconds and the
//! moment it stops counting (`expires`), by which the writer prunes it.
//!
//! It does not decide anything: the limiters keep deciding in memory, and
//! [`load`] gives them back what the file holds when the gateway starts.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode};
use tokio::sync::oneshot;

use super::{Durability, StoreError};

/// Most jobs written in one transaction.
const MAX_BATCH: usize = 4096;

/// Most expired rows of a table deleted between two batches, so pruning
/// never holds the writer (and the calls waiting on it) for long.
const PRUNE_CHUNK: usize = 2000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS admissions (
    key TEXT NOT NULL, policy NOT NULL, at INTEGER NOT NULL, expires INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS admissions_key ON admissions (key, at);
CREATE INDEX IF NOT EXISTS admissions_expires ON admissions (expires);
CREATE TABLE IF NOT EXISTS charges (
    key TEXT NOT NULL, end_at INTEGER NOT NULL, cost INTEGER NOT NULL, expires INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS charges_expires ON charges (expires);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL, sent INTEGER NOT NULL, estimate INTEGER NOT NULL,
    expires INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS holds (
    scope TEXT NOT NULL, key TEXT NOT NULL, policy NOT NULL, until INTEGER NOT NULL,
    PRIMARY KEY (scope, key));
CREATE TABLE IF NOT EXISTS reveals (
    key TEXT NOT NULL, policy NOT NULL, per INTEGER NOT NULL, lim INTEGER NOT NULL,
    expires INTEGER NOT NULL, PRIMARY KEY (key, per));
";

/// One journaled fact. Times are wall-clock UNIX nanoseconds; `key` is a
/// [`crate::quota::QuotaKey`] encoded by [`super::PolicyNames`], and
/// `policy` a policy's name.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A call was admitted at `at`; it counts until `expires`.
    Admit { key: String, policy: String, at: i64, expires: i64 },
    /// The admission at `at` never reached the upstream.
    Refund { key: String, at: i64 },
    /// The call admitted at `at` left for the upstream at `to`, and counts
    /// from there until `expires`.
    Restamp { key: String, at: i64, to: i64, expires: i64 },
    /// A hunting query was sent with this estimate reserved; until its
    /// charge or release replaces it, a restart charges the estimate.
    Pending { id: u64, key: String, sent: i64, estimate: i64, expires: i64 },
    /// Running time charged to `key` at `end`; replaces `pending` if any.
    Charge { pending: Option<u64>, key: String, end: i64, cost: i64, expires: i64 },
    /// The query in flight ended without a charge.
    Release { pending: u64 },
    /// The upstream holds `key` (`scope` "call" or "runtime") until `until`.
    Hold { scope: &'static str, key: String, policy: String, until: i64 },
    /// The upstream revealed a lower limit for `key`.
    /// A limit the upstream revealed; the key's admissions are kept at least
    /// `keep` (the window and the guard) after their time from then on.
    Reveal { key: String, policy: String, per: i64, limit: u32, expires: i64, keep: i64 },
}

/// Events for the writer, and whom to tell once they are on disk.
pub struct Job {
    pub events: Vec<Event>,
    pub ack: Option<oneshot::Sender<Result<(), String>>>,
}

/// What the file held for the open windows, read at startup. A policy is
/// named by its name, or as `#<position>` in a file of the earlier format.
#[derive(Debug, Default, PartialEq)]
pub struct Contents {
    /// `(key, policy, at)`.
    pub admissions: Vec<(String, String, i64)>,
    /// `(key, end, cost)`, queries in flight at a crash among them once
    /// [`charge_pending`] has charged them.
    pub charges: Vec<(String, i64, i64)>,
    /// `(scope, key, policy, until)`.
    pub holds: Vec<(String, String, String, i64)>,
    /// `(key, policy, per, limit)`.
    pub reveals: Vec<(String, String, i64, u32)>,
}

pub fn unix_now() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn classify(path: &Path, e: rusqlite::Error) -> StoreError {
    let detail = e.to_string();
    let path = path.display().to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt { path, detail },
        _ => StoreError::Unwritable { path, detail },
    }
}

/// Open (creating if needed) the file at `path`, check it and make sure it
/// can be written. A file that is not a sound SQLite database is
/// [`StoreError::Corrupt`]; one that cannot be created or written is
/// [`StoreError::Unwritable`].
pub fn open(path: &Path, sync: Durability) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Unwritable {
            path: path.display().to_string(),
            detail: format!("cannot create its directory: {e}"),
        })?;
    }
    let fail = |e| classify(path, e);
    let conn = Connection::open(path).map_err(fail)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(fail)?;
    if check != "ok" {
        return Err(StoreError::Corrupt { path: path.display().to_string(), detail: check });
    }
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(fail)?;
    let level = match sync {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", level).map_err(fail)?;
    conn.execute_batch(SCHEMA).map_err(fail)?;
    conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('opened', ?1)", params![unix_now().to_string()])
        .map_err(fail)?;
    Ok(conn)
}

/// Move a corrupt file (and its WAL) aside, so a fresh one can start.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let aside = PathBuf::from(format!("{}.corrupt-{}", path.display(), unix_now() / 1_000_000_000));
    std::fs::rename(path, &aside)?;
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(aside)
}

/// A row's policy: its name, or `#<position>` where a file of the earlier
/// format gave its position.
fn policy(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<String> {
    Ok(match r.get::<_, rusqlite::types::Value>(i)? {
        rusqlite::types::Value::Text(name) => name,
        rusqlite::types::Value::Integer(position) => format!("#{position}"),
        other => return Err(rusqlite::Error::InvalidColumnType(i, "policy".into(), other.data_type())),
    })
}

/// Charge every query that was in flight when the process died, in the
/// file itself, once: it may have run on at the service, which charges
/// what it ran, which the gateway never learnt. The rule's max(estimate,
/// wall time), the wall time up to `now` but no longer than a query may run
/// (`longest_run`), as ending at `now` (the latest it can have been
/// charged), counting for `horizon` from then. Its record in flight goes in
/// the same transaction, so a later restart neither charges it again nor
/// moves its charge. Returns how many were charged.
pub fn charge_pending(
    conn: &mut Connection,
    now: i64,
    longest_run: i64,
    horizon: i64,
) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let charged = tx.execute(
        "INSERT INTO charges (key, end_at, cost, expires)
         SELECT key, ?1, max(estimate, min(max(?1 - sent, 0), ?2)), ?3 FROM pending WHERE expires > ?1",
        params![now, longest_run.max(0), now.saturating_add(horizon)],
    )?;
    tx.execute("DELETE FROM pending", [])?;
    tx.commit()?;
    Ok(charged)
}

/// Everything in the file that still counts at `now`.
pub fn load(conn: &Connection, now: i64) -> rusqlite::Result<Contents> {
    let mut c = Contents::default();
    let mut q = conn.prepare("SELECT key, policy, at FROM admissions WHERE expires > ?1 ORDER BY key, at")?;
    c.admissions =
        q.query_map([now], |r| Ok((r.get(0)?, policy(r, 1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
    let mut q =
        conn.prepare("SELECT key, end_at, cost FROM charges WHERE expires > ?1 ORDER BY key, end_at")?;
    c.charges = q.query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
    let mut q = conn.prepare("SELECT scope, key, policy, until FROM holds WHERE until > ?1")?;
    c.holds = q
        .query_map([now], |r| Ok((r.get(0)?, r.get(1)?, policy(r, 2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    let mut q = conn.prepare("SELECT key, policy, per, lim FROM reveals WHERE expires > ?1")?;
    c.reveals = q
        .query_map([now], |r| Ok((r.get(0)?, policy(r, 1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    Ok(c)
}

/// Write one batch in one transaction.
pub fn write(conn: &mut Connection, events: &[&Event]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut admit =
            tx.prepare_cached("INSERT INTO admissions (key, policy, at, expires) VALUES (?1, ?2, ?3, ?4)")?;
        let mut refund = tx.prepare_cached(
            "DELETE FROM admissions WHERE rowid IN (SELECT rowid FROM admissions WHERE key = ?1 AND at = ?2 LIMIT 1)",
        )?;
        let mut restamp = tx.prepare_cached(
            "UPDATE admissions SET at = ?3, expires = max(expires - at + ?3, ?4)
             WHERE rowid IN (SELECT rowid FROM admissions WHERE key = ?1 AND at = ?2 LIMIT 1)",
        )?;
        let mut pending = tx.prepare_cached(
            "INSERT OR REPLACE INTO pending (id, key, sent, estimate, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut unpend = tx.prepare_cached("DELETE FROM pending WHERE id = ?1")?;
        let mut charge =
            tx.prepare_cached("INSERT INTO charges (key, end_at, cost, expires) VALUES (?1, ?2, ?3, ?4)")?;
        let mut hold = tx.prepare_cached(
            "INSERT INTO holds (scope, key, policy, until) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (scope, key) DO UPDATE SET until = max(until, excluded.until), policy = excluded.policy",
        )?;
        let mut reveal = tx.prepare_cached(
            "INSERT INTO reveals (key, policy, per, lim, expires) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (key, per) DO UPDATE SET lim = min(lim, excluded.lim), expires = excluded.expires",
        )?;
        let mut extend =
            tx.prepare_cached("UPDATE admissions SET expires = max(expires, at + ?2) WHERE key = ?1")?;
        for e in events {
            match e {
                Event::Admit { key, policy, at, expires } => {
                    admit.execute(params![key, policy, at, expires])?;
                }
                Event::Refund { key, at } => {
                    refund.execute(params![key, at])?;
                }
                Event::Restamp { key, at, to, expires } => {
                    restamp.execute(params![key, at, to, expires])?;
                }
                Event::Pending { id, key, sent, estimate, expires } => {
                    pending.execute(params![*id as i64, key, sent, estimate, expires])?;
                }
                Event::Charge { pending, key, end, cost, expires } => {
                    if let Some(id) = pending {
                        unpend.execute(params![*id as i64])?;
                    }
                    charge.execute(params![key, end, cost, expires])?;
                }
                Event::Release { pending } => {
                    unpend.execute(params![*pending as i64])?;
                }
                Event::Hold { scope, key, policy, until } => {
                    hold.execute(params![scope, key, policy, until])?;
                }
                Event::Reveal { key, policy, per, limit, expires, keep } => {
                    reveal.execute(params![key, policy, per, limit, expires])?;
                    extend.execute(params![key, keep])?;
                }
            }
        }
    }
    tx.commit()
}

/// Delete up to `chunk` rows of each table that no longer count at `now`.
/// Returns how many went, and whether some table may hold more.
pub fn prune(conn: &Connection, now: i64, chunk: usize) -> rusqlite::Result<(usize, bool)> {
    let chunk = i64::try_from(chunk).unwrap_or(i64::MAX);
    let (mut n, mut more) = (0, false);
    for (table, column) in [
        ("admissions", "expires"),
        ("charges", "expires"),
        ("pending", "expires"),
        ("holds", "until"),
        ("reveals", "expires"),
    ] {
        let sql = format!(
            "DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {column} <= ?1 LIMIT ?2)"
        );
        let gone = conn.execute(&sql, params![now, chunk])?;
        more |= i64::try_from(gone).unwrap_or(i64::MAX) >= chunk;
        n += gone;
    }
    Ok((n, more))
}

/// What the writer reports after each commit.
pub trait Observer: Send + 'static {
    fn committed(&self, jobs: usize, took: Duration, ok: bool);
}

/// The writer thread: group-commit every queued job, prune every `prune_every`.
pub fn run(mut conn: Connection, jobs: mpsc::Receiver<Job>, prune_every: Duration, observer: impl Observer) {
    let mut pruned = Instant::now();
    let mut pruning = false;
    loop {
        // While a prune is under way, its next chunk waits only for queued jobs.
        let idle = if pruning { Duration::ZERO } else { prune_every };
        let first = match jobs.recv_timeout(idle) {
            Ok(job) => Some(job),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if let Some(first) = first {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            let events: Vec<&Event> = batch.iter().flat_map(|j| j.events.iter()).collect();
            let result = write(&mut conn, &events).map_err(|e| e.to_string());
            observer.committed(batch.len(), started.elapsed(), result.is_ok());
            if let Err(e) = &result {
                tracing::error!(error = %e, events = events.len(), "the state file could not record a batch");
            }
            for job in batch {
                if let Some(ack) = job.ack {
                    let _ = ack.send(result.clone());
                }
            }
        }
        if pruning || pruned.elapsed() >= prune_every {
            pruned = Instant::now();
            match prune(&conn, unix_now(), PRUNE_CHUNK) {
                Ok((n, more)) => {
                    tracing::trace!(rows = n, "pruned expired rows from the state file");
                    pruning = more;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning the state file failed");
                    pruning = false;
                }
            }
            if !pruning {
                let _ = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)");
            }
        }
    }
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `events` written in one batch to a new file, which is then opened again.
    fn written(events: &[Event]) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut conn = open(&path, Durability::Full).unwrap();
        write(&mut conn, &events.iter().collect::<Vec<_>>()).unwrap();
        drop(conn);
        let conn = open(&path, Durability::Full).unwrap();
        (dir, conn)
    }

    #[test]
    fn a_batch_round_trips_and_expired_rows_are_pruned() {
        let k = "[null,\"t\",null]".to_string();
        let events = [
            Event::Admit { key: k.clone(), policy: "incidents".into(), at: 100, expires: 1_000 },
            Event::Admit { key: k.clone(), policy: "incidents".into(), at: 200, expires: 1_100 },
            Event::Admit { key: k.clone(), policy: "incidents".into(), at: 10, expires: 50 },
            Event::Refund { key: k.clone(), at: 200 },
            Event::Pending { id: 7, key: k.clone(), sent: 300, estimate: 40, expires: 2_000 },
            Event::Pending { id: 8, key: k.clone(), sent: 300, estimate: 40, expires: 2_000 },
            Event::Charge { pending: Some(7), key: k.clone(), end: 400, cost: 25, expires: 2_000 },
            Event::Release { pending: 8 },
            Event::Hold { scope: "call", key: k.clone(), policy: "incidents".into(), until: 900 },
            Event::Hold { scope: "call", key: k.clone(), policy: "incidents".into(), until: 800 },
            Event::Reveal {
                key: k.clone(),
                policy: "incidents".into(),
                per: 60,
                limit: 30,
                expires: 2_000,
                keep: 30,
            },
        ];
        let (_dir, conn) = written(&events);
        let c = load(&conn, 60).unwrap();
        assert_eq!(c.admissions, vec![(k.clone(), "incidents".to_string(), 100)]);
        assert_eq!(c.charges, vec![(k.clone(), 400, 25)]);
        assert_eq!(c.holds, vec![("call".to_string(), k.clone(), "incidents".to_string(), 900)]);
        assert_eq!(c.reveals, vec![(k.clone(), "incidents".to_string(), 60, 30)]);
        assert_eq!(prune(&conn, 1_000, 1).unwrap(), (2, true), "one row a table at a time");
        assert_eq!(prune(&conn, 1_000, 100).unwrap(), (1, false), "two admissions and the hold have expired");
        assert!(load(&conn, 1_000).unwrap().admissions.is_empty());
    }

    #[test]
    fn a_restamped_admission_is_restored_at_its_departure_and_refunded_there() {
        let k = "[null,\"t\",null]".to_string();
        let events = [
            Event::Admit { key: k.clone(), policy: "incidents".into(), at: 100, expires: 1_000 },
            Event::Admit { key: k.clone(), policy: "incidents".into(), at: 100, expires: 1_000 },
            Event::Admit { key: k.clone(), policy: "incidents".into(), at: 200, expires: 1_100 },
            // One of the two admissions at 100 left at 400, counting until 1_300.
            Event::Restamp { key: k.clone(), at: 100, to: 400, expires: 1_300 },
            // The one at 200 left at 250, then its upstream refused the connection.
            Event::Restamp { key: k.clone(), at: 200, to: 250, expires: 1_150 },
            Event::Refund { key: k.clone(), at: 250 },
            // Nothing was admitted at 150: nothing moves.
            Event::Restamp { key: k.clone(), at: 150, to: 500, expires: 1_400 },
        ];
        let (_dir, conn) = written(&events);
        let c = load(&conn, 60).unwrap();
        let at = |t| (k.clone(), "incidents".to_string(), t);
        assert_eq!(c.admissions, vec![at(100), at(400)]);
        assert_eq!(load(&conn, 1_000).unwrap().admissions, vec![at(400)], "it counts from its departure");
    }

    #[test]
    fn garbage_is_corrupt_and_a_pending_query_is_charged_by_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(matches!(open(&path, Durability::Full), Err(StoreError::Corrupt { .. })));
        let aside = set_aside(&path).unwrap();
        assert!(aside.exists() && !path.exists());
        let mut conn = open(&path, Durability::Full).unwrap();
        let pending = |conn: &mut Connection| {
            let e = Event::Pending { id: 1, key: "k".into(), sent: 5, estimate: 9, expires: 100 };
            write(conn, &[&e]).unwrap();
        };
        let charged_at = |conn: &mut Connection, now: i64, longest_run: i64| {
            assert_eq!(charge_pending(conn, now, longest_run, 1_000).unwrap(), 1);
            let charges = load(conn, now).unwrap().charges;
            conn.execute("DELETE FROM charges", []).unwrap();
            charges
        };
        // Sent at 5: read at 10, its estimate (9) is more than the 5 it ran.
        pending(&mut conn);
        assert_eq!(charged_at(&mut conn, 10, 1_000), vec![("k".to_string(), 10, 9)]);
        // Read at 50, it ran 45: more than its estimate.
        pending(&mut conn);
        assert_eq!(charged_at(&mut conn, 50, 1_000), vec![("k".to_string(), 50, 45)]);
        // A query runs 20 at the most: read at 90, it ran no more than that.
        pending(&mut conn);
        assert_eq!(charged_at(&mut conn, 90, 20), vec![("k".to_string(), 90, 20)]);
        // Charged once: a later start finds the charge where it was put.
        pending(&mut conn);
        charge_pending(&mut conn, 50, 1_000, 1_000).unwrap();
        assert_eq!(charge_pending(&mut conn, 70, 1_000, 1_000).unwrap(), 0);
        assert_eq!(load(&conn, 70).unwrap().charges, vec![("k".to_string(), 50, 45)]);
    }
}
