//! The sql-log transport: consumers read the log table directly.
//!
//! A consumer group's messages are split into a fixed number of partitions by key hash; each
//! partition keeps its own offset and is read in order by exactly one consumer at a time,
//! which holds a lease on it. Consumers of a group register as members and each takes a fair
//! share of the partitions; a crashed consumer's leases lapse and the others take them over.
//! Consumers wake when a commit moves the log head (no polling), with a slow safety poll.

use crate::broker::{self, Broker, BrokerError};
use crate::bus::{Bus, BusError, Consumer};
use crate::db::UnitOfWork;
use crate::db::{Database, StoreError};
use crate::dead_letter::Announce;
use crate::dispatch::{metric, BatchOutcome, Dispatcher, Outcome};
use crate::envelope::now_millis;
use crate::envelope::Envelope;
use crate::handler::{HandlerError, Subscription};
use crate::log::{self, Cursor, Entry};
use crate::sql::{self, Conn};
use crate::{dead_letter, retry};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How often an idle partition looks at the log even without a wake-up.
const SAFETY_POLL: Duration = Duration::from_secs(5);
/// The shortest interval between lease renewals.
const MIN_TICK: Duration = Duration::from_millis(10);
/// How long to back off after a failed read or acknowledgement.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The embedded transport over the database's log table.
pub struct SqlLog {
    db: Database,
}

/// The last position of `topic` in the log, 0 for none.
async fn last_on_topic(db: &Database, topic: &str) -> Result<i64, StoreError> {
    let topic = topic.to_owned();
    db.read(move |conn| {
        let last: Option<i64> = conn.scalar(
            "SELECT MAX(position) FROM conveyor_log WHERE topic = ?",
            [&topic],
        )?;
        Ok(last.unwrap_or_default())
    })
    .await
}

impl SqlLog {
    pub fn new(db: Database) -> Self {
        SqlLog { db }
    }

    /// Follows `topic` from this process: the receiver changes each time a message on it
    /// commits, in any process on the database (woken by the log head, so within the
    /// watcher's delay for other processes). For what every process must hear of, such as
    /// invalidating a cache, where a consumer group would tell only one of them. It holds
    /// the last position on the topic, and ends when the database closes.
    pub fn watch(&self, topic: &str) -> tokio::sync::watch::Receiver<i64> {
        let (tell, told) = tokio::sync::watch::channel(0);
        let (db, topic) = (self.db.clone(), topic.to_owned());
        tokio::spawn(async move {
            let mut head = db.head();
            let topics = [topic];
            // The head before the last read: the read told the topic's last position up to it.
            let mut read_through = None;
            loop {
                let head_seen = *head.borrow_and_update();
                if read_through.is_none_or(|at| db.log_may_hold(&topics, at)) {
                    match last_on_topic(&db, &topics[0]).await {
                        Ok(last) => {
                            read_through = Some(head_seen);
                            tell.send_if_modified(|seen| std::mem::replace(seen, last) != last);
                        }
                        Err(error) => {
                            // The commit that moved the head may be the one looked for: read
                            // again soon rather than at the next commit.
                            tracing::warn!(%error, "cannot follow a topic of the log; reading again");
                            tokio::select! {
                                () = tell.closed() => return,
                                () = tokio::time::sleep(ERROR_PAUSE) => continue,
                            }
                        }
                    }
                }
                tokio::select! {
                    () = tell.closed() => return,
                    changed = head.changed() => if changed.is_err() { return },
                }
            }
        });
        told
    }

    /// How many messages on `topic` wait for `group`: those past their partition's offset
    /// (all of them before the group first joined).
    pub async fn backlog(&self, group: &str, topic: &str) -> Result<i64, StoreError> {
        rows_behind(&self.db, group, group, topic).await
    }
}

/// How many rows of `topic` for `group` (its replays included) lie past `reader`'s offsets:
/// what `group` has yet to handle when it reads the log itself, or what the relay has yet
/// to publish for it.
pub(crate) async fn rows_behind(
    db: &Database,
    reader: &str,
    group: &str,
    topic: &str,
) -> Result<i64, StoreError> {
    let (reader, group, topic) = (reader.to_owned(), group.to_owned(), topic.to_owned());
    db.read(move |conn| {
        Ok(conn.scalar(
            "SELECT COUNT(*) FROM conveyor_log l \
             LEFT JOIN conveyor_partitions p ON p.group_name = ? \
               AND p.\"partition\" = l.key_hash % (SELECT NULLIF(partitions, 0) \
                   FROM conveyor_groups WHERE group_name = ?) \
             WHERE l.topic = ? AND l.position > COALESCE(p.position, 0) \
               AND (l.only_group IS NULL OR l.only_group = ?)",
            (&reader, &reader, &topic, &group),
        )?)
    })
    .await
}

impl Bus for SqlLog {
    fn subscribe(&self, subscription: Subscription) -> BoxFuture<'_, Result<Consumer, BusError>> {
        start(&self.db, subscription, Lanes::Log).boxed()
    }

    fn backlog<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<i64, BusError>> {
        async move { Ok(SqlLog::backlog(self, group, topic).await?) }.boxed()
    }
}

/// What a group's lanes read, and what they do with it.
pub(crate) enum Lanes {
    /// Consumers reading the log.
    Log,
    /// The outbox relay: reads every row of the log and publishes it to the broker.
    Relay(Arc<dyn Broker>),
    /// Consumers reading the broker (`broker::run_lane`).
    Broker(Arc<dyn Broker>),
}

/// Joins `subscription`'s group and starts its lanes, which read as `lanes` says.
pub(crate) async fn start(
    db: &Database,
    subscription: Subscription,
    lanes: Lanes,
) -> Result<Consumer, BusError> {
    if subscription.routes.is_empty() && !matches!(lanes, Lanes::Relay(_)) {
        return Err(BusError::Empty(subscription.group));
    }
    let options = &subscription.options;
    if options.lease < options.handler_timeout.saturating_mul(2) {
        return Err(BusError::LeaseTooShort {
            group: subscription.group,
            lease: options.lease,
            handler_timeout: options.handler_timeout,
        });
    }
    let group: Arc<str> = subscription.group.into();
    let shared = Arc::new(Shared {
        member: Uuid::now_v7().to_string(),
        topics: subscription.topics.into(),
        names: subscription.routes.keys().copied().collect(),
        partitions: i64::from(subscription.options.partitions.max(1)),
        lease: subscription.options.lease,
        batch: i64::from(subscription.options.batch.max(1)),
        linger: subscription.options.linger,
        linger_at_rest: subscription.options.linger_at_rest,
        dispatcher: Dispatcher {
            db: db.clone(),
            group: group.clone(),
            routes: subscription.routes,
            retry: subscription.options.retry,
            timeout: subscription.options.handler_timeout,
            inbox: subscription.inbox,
            announce: match lanes {
                Lanes::Broker(_) => Announce::Publish,
                Lanes::Log | Lanes::Relay(_) => Announce::No,
            },
        },
        lanes,
        group,
    });
    join(&shared).await?;
    register_metrics(&shared);
    let stop = CancellationToken::new();
    let task = tokio::spawn(coordinate(shared, stop.clone()));
    Ok(Consumer::new(stop, task))
}

pub(crate) struct Shared {
    pub(crate) group: Arc<str>,
    pub(crate) member: String,
    pub(crate) topics: Arc<[String]>,
    pub(crate) names: Arc<[&'static str]>,
    partitions: i64,
    lease: Duration,
    pub(crate) batch: i64,
    linger: Duration,
    linger_at_rest: bool,
    pub(crate) dispatcher: Dispatcher,
    lanes: Lanes,
}

impl Shared {
    fn db(&self) -> &Database {
        &self.dispatcher.db
    }

    fn lease_millis(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// Does a read of `rows` wait for more (`ConsumerOptions::linger`)?
    fn lingers_for(&self, rows: usize) -> bool {
        !self.linger.is_zero()
            && (rows as i64) < self.batch
            && (self.linger_at_rest || self.db().is_busy())
    }
}

/// What a group's members must agree on: which messages it handles, and how it splits
/// them. A member that handled fewer names would acknowledge the others unhandled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Agreement {
    topics: Vec<String>,
    names: Vec<String>,
}

impl Agreement {
    fn of(shared: &Shared) -> Self {
        let mut topics = shared.topics.to_vec();
        let mut names: Vec<String> = shared.names.iter().map(|name| (*name).to_owned()).collect();
        topics.sort_unstable();
        names.sort_unstable();
        Agreement { topics, names }
    }
}

impl std::fmt::Display for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "topics [{}], names [{}]",
            self.topics.join(", "),
            self.names.join(", ")
        )
    }
}

/// Joins the group: records what it handles and its partitions on first use, and checks
/// this member agrees with them otherwise. A member whose handlers differ from the live
/// members' is refused; once none is live (a stopped or crashed old version has left or
/// timed out, which this waits up to one lease for), the group takes the new handlers.
/// The partition count never changes: offsets are kept per partition.
async fn join(shared: &Arc<Shared>) -> Result<(), BusError> {
    let deadline = tokio::time::Instant::now() + shared.lease;
    loop {
        match try_join(shared).await {
            Ok(()) => return Ok(()),
            Err(refused @ BusError::SubscriptionMismatch { .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(error = %refused, "waiting for the group's other members to leave or time out");
                tokio::time::sleep((shared.lease / 10).max(MIN_TICK)).await;
            }
            // A deadlock or a lost connection says nothing about the group: try again.
            Err(BusError::Store(error))
                if error.is_infrastructure() && tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(%error, "cannot join the group yet; will try again");
                tokio::time::sleep(MIN_TICK).await;
            }
            Err(refused) => return Err(refused),
        }
    }
}

/// Drops the group's members whose time ran out and renews this one's for a lease. `join`
/// does it in the unit that checks the agreement, so a differing member joining at the same
/// time sees this one.
fn renew_membership(conn: &Conn, shared: &Shared, now: i64) -> Result<(), sql::Error> {
    let group = &*shared.group;
    conn.execute(
        "DELETE FROM conveyor_members WHERE group_name = ? AND seen_until < ?",
        (group, now),
    )?;
    conn.execute(
        "INSERT INTO conveyor_members (group_name, \"member\", seen_until) VALUES (?, ?, ?) \
         ON CONFLICT (group_name, \"member\") DO UPDATE SET seen_until = excluded.seen_until",
        (
            group,
            &shared.member,
            now.saturating_add(shared.lease_millis()),
        ),
    )?;
    Ok(())
}

/// One try at `join`. A refusal rolls its unit back, like a store error.
async fn try_join(shared: &Arc<Shared>) -> Result<(), BusError> {
    let shared = shared.clone();
    let db = shared.db().clone();
    db.write(move |uow| {
        let conn = uow.conn();
        let group = &*shared.group;
        let now = now_millis();
        let mine = Agreement::of(&shared);
        lock_group(conn, group)?;
        let recorded: Option<(i64, String)> = conn
            .query_opt(
                "SELECT partitions, agreement FROM conveyor_groups WHERE group_name = ?",
                [group],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?
            .filter(|(_, agreement): &(i64, String)| !agreement.is_empty());
        // Groups from before the agreement was recorded have only their partitions.
        let partitions: i64 = match &recorded {
            Some((partitions, _)) => *partitions,
            None => conn.scalar(
                "SELECT COUNT(*) FROM conveyor_partitions WHERE group_name = ?",
                [group],
            )?,
        };
        if partitions != 0 && partitions != shared.partitions {
            return Err(BusError::PartitionMismatch {
                group: group.to_owned(),
                existing: partitions,
                requested: shared.partitions,
            });
        }
        let live: i64 = conn.scalar(
            "SELECT COUNT(*) FROM conveyor_members \
             WHERE group_name = ? AND \"member\" <> ? AND seen_until >= ?",
            (group, &shared.member, now),
        )?;
        let theirs = recorded.and_then(|(_, text)| serde_json::from_str::<Agreement>(&text).ok());
        if let Some(theirs) = theirs.filter(|theirs| *theirs != mine && live > 0) {
            return Err(BusError::SubscriptionMismatch {
                group: group.to_owned(),
                live: theirs.to_string(),
                requested: mine.to_string(),
            });
        }
        let agreement = serde_json::to_string(&mine).map_err(|error| sql::Error::Encode {
            what: "the group's agreement",
            message: error.to_string(),
        })?;
        conn.execute(
            "UPDATE conveyor_groups SET partitions = ?, agreement = ? WHERE group_name = ?",
            (shared.partitions, &agreement, group),
        )?;
        conn.execute(
            "DELETE FROM conveyor_group_topics WHERE group_name = ?",
            [group],
        )?;
        for topic in log_topics_read(&shared) {
            conn.execute(
                "INSERT INTO conveyor_group_topics (group_name, topic) VALUES (?, ?)",
                (group, topic),
            )?;
        }
        for partition in 0..shared.partitions {
            conn.execute(
                "INSERT INTO conveyor_partitions (group_name, \"partition\") VALUES (?, ?) \
                 ON CONFLICT (group_name, \"partition\") DO NOTHING",
                (group, partition),
            )?;
        }
        renew_membership(conn, &shared, now)?;
        Ok(())
    })
    .await
}

/// The topics of the log a group reads, for retention: a group reading the broker reads
/// none, the relay reads every one (`*`).
fn log_topics_read(shared: &Shared) -> Vec<&str> {
    match &shared.lanes {
        Lanes::Log => shared.topics.iter().map(String::as_str).collect(),
        Lanes::Relay(_) => vec![ALL_TOPICS],
        Lanes::Broker(_) => Vec::new(),
    }
}

/// Stands for every topic in `conveyor_group_topics`.
pub(crate) const ALL_TOPICS: &str = "*";

/// Makes the joins of `group` wait for each other, on every backend: the group's row (a
/// placeholder with no agreement on first use, which the join fills in or rolls back) is
/// locked until the joining unit ends. A server's transactions do not serialise as SQLite's
/// do: without it, two differing members joining at once could both see no live member.
///
/// One statement that inserts or locks: an insert-or-ignore followed by an update would take
/// a shared lock and then ask for an exclusive one, which two joins deadlock on in InnoDB.
fn lock_group(conn: &Conn, group: &str) -> Result<(), sql::Error> {
    conn.execute(
        "INSERT INTO conveyor_groups (group_name, partitions, agreement) VALUES (?, 0, '') \
         ON CONFLICT (group_name) DO UPDATE SET partitions = conveyor_groups.partitions",
        [group],
    )?;
    Ok(())
}

/// Every series of the group from the start, at zero: its handlers' counters and each
/// partition's lag.
fn register_metrics(shared: &Shared) {
    let group = shared.group.to_string();
    for name in shared.names.iter() {
        let labels = [("group", group.clone()), ("message", (*name).to_owned())];
        for counter in [
            metric::HANDLED,
            metric::FAILED,
            metric::RETRIED,
            metric::DEAD_LETTERED,
        ] {
            metrics::counter!(counter, &labels).increment(0);
        }
        let _registered = metrics::histogram!(metric::DURATION, &labels);
    }
    let labels = [("group", group.clone())];
    let _registered = metrics::histogram!(metric::BATCH_MESSAGES, &labels);
    let _registered = metrics::histogram!(metric::BATCH_SECONDS, &labels);
    for partition in 0..shared.partitions {
        metrics::gauge!(metric::CONSUMER_LAG, "group" => group.clone(), "partition" => partition.to_string())
            .set(0.0);
    }
}

/// Keeps this consumer's fair share of partitions leased and runs one lane per partition.
async fn coordinate(shared: Arc<Shared>, stop: CancellationToken) {
    let mut lanes: HashMap<i64, CancellationToken> = HashMap::new();
    let mut running = JoinSet::new();
    let mut tick = tokio::time::interval((shared.lease / 3).max(MIN_TICK));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        while running.try_join_next().is_some() {}
        lanes.retain(|_, lane: &mut CancellationToken| !lane.is_cancelled());
        let share = match rebalance(&shared).await {
            Ok(Rebalanced::Share(share)) => share,
            Ok(Rebalanced::Superseded(theirs)) => {
                tracing::error!(group = %shared.group, handlers = %theirs, "this member lapsed and the group now runs other handlers; it stops consuming");
                break;
            }
            Err(error) => {
                tracing::warn!(%error, group = %shared.group, "cannot renew partition leases");
                continue;
            }
        };
        for partition in &share.keep {
            lanes.entry(*partition).or_insert_with(|| {
                let lane = stop.child_token();
                let (shared, partition, done) = (shared.clone(), *partition, lane.clone());
                running.spawn(async move {
                    let group = shared.group.to_string();
                    match &shared.lanes {
                        Lanes::Broker(broker) => {
                            let broker = broker.clone();
                            broker::run_lane(shared, broker, partition, done.clone()).await;
                        }
                        Lanes::Log | Lanes::Relay(_) => {
                            run_lane(shared, partition, done.clone()).await;
                        }
                    }
                    // The new owner reports this partition's lag from now on.
                    metrics::gauge!(metric::CONSUMER_LAG, "group" => group, "partition" => partition.to_string())
                        .set(0.0);
                    // Marks the lane finished, so the next tick restarts it if still owned.
                    done.cancel();
                });
                lane
            });
        }
        lanes.retain(|partition, lane| {
            let keep = share.keep.contains(partition);
            if !keep {
                lane.cancel();
            }
            keep
        });
        if !share.surplus.is_empty() {
            // Lanes of surplus partitions stop first, so no message is in flight when the
            // partition changes hands.
            for partition in &share.surplus {
                if let Some(lane) = lanes.remove(partition) {
                    lane.cancel();
                }
            }
            while running.len() > lanes.len() {
                if running.join_next().await.is_none() {
                    break;
                }
            }
            if let Err(error) = release(&shared, share.surplus).await {
                tracing::warn!(%error, group = %shared.group, "cannot release partitions");
            }
        }
    }
    while running.join_next().await.is_some() {}
    if let Err(error) = leave(&shared).await {
        tracing::warn!(%error, group = %shared.group, "cannot release partitions on stop");
    }
}

struct Share {
    keep: Vec<i64>,
    surplus: Vec<i64>,
}

enum Rebalanced {
    Share(Share),
    /// The group has taken other handlers while this member was away.
    Superseded(String),
}

/// The agreement the group has recorded, if any.
fn recorded_agreement(conn: &Conn, group: &str) -> Result<Option<Agreement>, sql::Error> {
    let text: Option<String> = conn.query_opt(
        "SELECT agreement FROM conveyor_groups WHERE group_name = ?",
        [group],
        |row| row.get(0),
    )?;
    Ok(text.and_then(|text| serde_json::from_str(&text).ok()))
}

/// Renews this member, renews its leases and claims free partitions up to a fair share.
async fn rebalance(shared: &Arc<Shared>) -> Result<Rebalanced, StoreError> {
    let shared = shared.clone();
    let db = shared.db().clone();
    db.write(move |uow| {
        let conn = uow.conn();
        let (group, member) = (&*shared.group, shared.member.as_str());
        let now = now_millis();
        let until = now.saturating_add(shared.lease_millis());
        // A member that lapsed (its process stalled past a lease) may have been replaced by
        // a version with other handlers meanwhile: it must not come back beside them.
        let lapsed: bool = conn.scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM conveyor_members \
             WHERE group_name = ? AND \"member\" = ? AND seen_until >= ?)",
            (group, member, now),
        )?;
        if lapsed {
            if let Some(theirs) =
                recorded_agreement(conn, group)?.filter(|theirs| *theirs != Agreement::of(&shared))
            {
                return Ok(Rebalanced::Superseded(theirs.to_string()));
            }
        }
        renew_membership(conn, &shared, now)?;
        let members: i64 = conn.scalar(
            "SELECT COUNT(*) FROM conveyor_members WHERE group_name = ?",
            [group],
        )?;
        let fair = usize::try_from((shared.partitions + members - 1) / members.max(1))
            .unwrap_or(usize::MAX);
        conn.execute(
            "UPDATE conveyor_partitions SET lease_until = ? WHERE group_name = ? AND owner = ?",
            (until, group, member),
        )?;
        let mut mine: Vec<i64> = conn.query_map(
            "SELECT \"partition\" FROM conveyor_partitions \
             WHERE group_name = ? AND owner = ? ORDER BY \"partition\"",
            (group, member),
            |row| row.get(0),
        )?;
        if mine.len() < fair {
            let wanted = i64::try_from(fair - mine.len()).unwrap_or(i64::MAX);
            let free: Vec<i64> = conn.query_map(
                "SELECT \"partition\" FROM conveyor_partitions \
                 WHERE group_name = ? AND (owner IS NULL OR lease_until < ?) \
                 ORDER BY \"partition\" LIMIT ?",
                (group, now, wanted),
                |row| row.get(0),
            )?;
            for partition in free {
                // Conditional, so that of two members claiming a partition at once on a
                // server (whose transactions do not serialise) only one gets it.
                let claimed = conn.execute(
                    "UPDATE conveyor_partitions SET owner = ?, lease_until = ? \
                     WHERE group_name = ? AND \"partition\" = ? \
                       AND (owner IS NULL OR lease_until < ?)",
                    (member, until, group, partition, now),
                )?;
                if claimed == 1 {
                    mine.push(partition);
                }
            }
        }
        let surplus = mine.split_off(fair.min(mine.len()));
        Ok(Rebalanced::Share(Share {
            keep: mine,
            surplus,
        }))
    })
    .await
}

async fn release(shared: &Arc<Shared>, partitions: Vec<i64>) -> Result<(), StoreError> {
    let shared = shared.clone();
    let db = shared.db().clone();
    db.write(move |uow| {
        for partition in &partitions {
            uow.conn().execute(
                "UPDATE conveyor_partitions SET owner = NULL, lease_until = 0 \
                 WHERE group_name = ? AND \"partition\" = ? AND owner = ?",
                (&*shared.group, partition, &shared.member),
            )?;
        }
        Ok(())
    })
    .await
}

/// Hands every partition back and deregisters, so the others rebalance at once.
async fn leave(shared: &Arc<Shared>) -> Result<(), StoreError> {
    let shared = shared.clone();
    let db = shared.db().clone();
    db.write(move |uow| {
        let conn = uow.conn();
        conn.execute(
            "UPDATE conveyor_partitions SET owner = NULL, lease_until = 0 \
             WHERE group_name = ? AND owner = ?",
            (&*shared.group, &shared.member),
        )?;
        conn.execute(
            "DELETE FROM conveyor_members WHERE group_name = ? AND \"member\" = ?",
            (&*shared.group, &shared.member),
        )?;
        Ok(())
    })
    .await
}

/// Reads one partition in order, hands each message to the dispatcher, and acknowledges by
/// moving the partition's offset. Stops when cancelled or when the lease is lost.
async fn run_lane(shared: Arc<Shared>, partition: i64, stop: CancellationToken) {
    let mut head = shared.db().head();
    let mut position = match offset(&shared, partition).await {
        Ok(position) => position,
        Err(error) => {
            tracing::warn!(%error, group = %shared.group, partition, "cannot read the offset");
            return;
        }
    };
    let partition_label = partition.to_string();
    let lag = metrics::gauge!(metric::CONSUMER_LAG, "group" => shared.group.to_string(), "partition" => partition_label);
    // How far the log is known to hold nothing more for this partition: reads start here,
    // so they skip other partitions' messages already looked past.
    let mut scanned = position;
    // Consecutive steps the store failed, for the backoff.
    let mut outages = 0;
    // Whether the batch in hand already waited for more (`ConsumerOptions::linger`).
    let mut lingered = false;
    // The full batch after the one in hand, read while that one was handled.
    let mut read_ahead: Option<Vec<(i64, Entry)>> = None;
    // Woken by the safety poll: the next read is made whatever the head's records say, in
    // case a wake-up was missed (a watcher that failed).
    let mut polled = false;
    let limit = shared.batch;
    // A busy partition never reads empty: the stop is checked before every read.
    while !stop.is_cancelled() {
        let head_seen = *head.borrow_and_update();
        let batch = match read_ahead.take() {
            Some(batch) => batch,
            // What moved the head is on other topics: an empty read without the round trip.
            None if !polled && !may_hold(&shared, scanned.max(position)) => Vec::new(),
            None => match read_batch(&shared, partition, scanned.max(position)).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(%error, group = %shared.group, partition, "cannot read the log");
                    if pause(&stop, ERROR_PAUSE).await {
                        return;
                    }
                    continue;
                }
            },
        };
        if batch.is_empty() {
            // Everything up to `head_seen` had committed before the read began.
            scanned = scanned.max(head_seen);
            lag.set(0.0);
            match wait_for_head(&mut head, &stop).await {
                Wake::Moved => polled = false,
                Wake::Polled => polled = true,
                Wake::Stopped => return,
            }
            continue;
        }
        polled = false;
        lag.set((head_seen - position).max(0) as f64);
        if !lingered && shared.lingers_for(batch.len()) {
            lingered = true;
            if pause(&stop, shared.linger).await {
                return;
            }
            continue;
        }
        lingered = false;
        // A full batch says a backlog waits: the next batch is read while this one is
        // handled, so that reading and committing overlap. It is kept only if this one
        // was acknowledged whole and it is full too (a shorter one is read again, after
        // the linger).
        let last = batch.last().map(|(at, _)| *at);
        let backlogged = batch.len() as i64 == limit;
        let step = async {
            match split_at_corrupt(batch) {
                Split::Corrupt { at, error } => {
                    dead_letter_corrupt(&shared, partition, at, error).await
                }
                Split::Messages(batch) => match &shared.lanes {
                    Lanes::Relay(broker) => relay(&shared, broker.as_ref(), partition, batch).await,
                    Lanes::Log | Lanes::Broker(_) => {
                        deliver(&shared, partition, position, batch, &stop).await
                    }
                },
            }
        };
        let (step, next) = match last {
            Some(last) if backlogged => {
                let (step, next) = tokio::join!(step, read_batch(&shared, partition, last));
                (step, next.ok().filter(|next| next.len() as i64 == limit))
            }
            _ => (step.await, None),
        };
        match step {
            Ok(acknowledged) => {
                outages = 0;
                position = position.max(acknowledged);
                read_ahead = next.filter(|_| Some(acknowledged) == last);
                // A short batch was all the partition held up to `head_seen`: the read that
                // would follow it finds nothing until the head moves, and on a server it is
                // a round trip per lane per commit. Wait for the head, as after an empty read.
                if !backlogged && Some(acknowledged) == last {
                    scanned = scanned.max(head_seen);
                    match wait_for_head(&mut head, &stop).await {
                        Wake::Moved => {}
                        Wake::Polled => polled = true,
                        Wake::Stopped => return,
                    }
                }
            }
            Err(LaneEnd::Outage(error)) => {
                outages += 1;
                let delay = retry::OUTAGE.delay(outages);
                tracing::warn!(%error, group = %shared.group, partition, ?delay, "will try the batch again");
                if pause(&stop, delay).await {
                    return;
                }
            }
            Err(LaneEnd::NotOwned) => {
                tracing::info!(group = %shared.group, partition, "partition lease lost");
                return;
            }
            Err(LaneEnd::Stopped) => return,
        }
    }
}

/// May the log hold a row for this group's lanes after `after`? The relay reads every topic.
fn may_hold(shared: &Shared, after: i64) -> bool {
    match shared.lanes {
        Lanes::Relay(_) => true,
        Lanes::Log | Lanes::Broker(_) => shared.db().log_may_hold(&shared.topics, after),
    }
}

/// How an idle lane's wait for the log's head ended.
enum Wake {
    Moved,
    /// `SAFETY_POLL` passed without the head moving.
    Polled,
    Stopped,
}

async fn wait_for_head(
    head: &mut tokio::sync::watch::Receiver<i64>,
    stop: &CancellationToken,
) -> Wake {
    tokio::select! {
        () = stop.cancelled() => Wake::Stopped,
        _ = head.changed() => Wake::Moved,
        () = tokio::time::sleep(SAFETY_POLL) => Wake::Polled,
    }
}

/// Up to a batch of `partition`'s rows after position `after`, as the group's lanes read
/// them.
async fn read_batch(
    shared: &Arc<Shared>,
    partition: i64,
    after: i64,
) -> Result<Vec<(i64, Entry)>, StoreError> {
    let cursor = Cursor {
        group: shared.group.clone(),
        // The relay reads every row, replays for one group included.
        topics: match shared.lanes {
            Lanes::Relay(_) => None,
            Lanes::Log | Lanes::Broker(_) => Some(shared.topics.clone()),
        },
        names: shared.names.clone(),
        partitions: shared.partitions,
        partition,
        after,
    };
    let limit = shared.batch;
    shared
        .db()
        .read(move |conn| Ok::<_, StoreError>(log::read(conn, &cursor, limit)?))
        .await
}

/// Why a lane's step did not acknowledge what it read.
pub(crate) enum LaneEnd {
    NotOwned,
    Stopped,
    /// The store (or the broker) failed; nothing committed, and the same rows are to be
    /// tried again.
    Outage(Outage),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum Outage {
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Publishes a batch of log rows to the broker, then moves the relay's offset past them.
/// A crash in between publishes them again: consumers' inboxes make that a no-op. The rows
/// are on disk before they leave: a row a power cut could still take back must not have
/// been published.
async fn relay(
    shared: &Arc<Shared>,
    broker: &dyn Broker,
    partition: i64,
    batch: Vec<(i64, Entry)>,
) -> Result<i64, LaneEnd> {
    let Some(&(last, _)) = batch.last() else {
        return Ok(0);
    };
    let publications = batch
        .iter()
        .filter_map(|(position, entry)| match entry {
            Entry::Message(envelope) => Some(broker::publication(
                envelope,
                *position,
                broker.partitions(),
            )),
            Entry::Skipped | Entry::Corrupt(_) => None,
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| LaneEnd::Outage(error.into()))?;
    shared
        .db()
        .flush_through(last)
        .await
        .map_err(|error| LaneEnd::Outage(error.into()))?;
    broker::within(broker::BROKER_CALL, broker.publish(&publications))
        .await
        .map_err(|error| LaneEnd::Outage(error.into()))?;
    match shared
        .db()
        .write(acknowledge(shared.clone(), partition, last))
        .await
    {
        Ok(true) => Ok(last),
        Ok(false) => Err(LaneEnd::NotOwned),
        Err(error) => Err(LaneEnd::Outage(error.into())),
    }
}

/// A batch as read, cut before its first row that does not decode.
pub(crate) enum Split {
    Messages(Vec<(i64, Entry)>),
    /// The batch starts with an undecodable row.
    Corrupt {
        at: i64,
        error: String,
    },
}

pub(crate) fn split_at_corrupt(mut batch: Vec<(i64, Entry)>) -> Split {
    match batch
        .iter()
        .position(|(_, entry)| matches!(entry, Entry::Corrupt(_)))
    {
        Some(0) => {
            let (at, entry) = batch.swap_remove(0);
            let Entry::Corrupt(error) = entry else {
                unreachable!("the row found corrupt")
            };
            Split::Corrupt { at, error }
        }
        Some(first) => {
            batch.truncate(first);
            Split::Messages(batch)
        }
        None => Split::Messages(batch),
    }
}

/// Delivers a batch of decoded rows: all of it and its acknowledgement in one unit of work
/// in the common case. Returns the position acknowledged.
pub(crate) async fn deliver(
    shared: &Arc<Shared>,
    partition: i64,
    position: i64,
    batch: Vec<(i64, Entry)>,
    stop: &CancellationToken,
) -> Result<i64, LaneEnd> {
    // The acknowledgement moves past the messages the group does not handle, too.
    let last = batch.last().map_or(position, |(at, _)| *at);
    let (positions, envelopes): (Vec<i64>, Vec<Arc<Envelope>>) = batch
        .into_iter()
        .filter_map(|(at, entry)| match entry {
            Entry::Message(envelope) => Some((at, Arc::new(envelope))),
            Entry::Skipped | Entry::Corrupt(_) => None,
        })
        .unzip();
    let outcome = shared
        .dispatcher
        .deliver_batch(&envelopes, acknowledge(shared.clone(), partition, last))
        .await;
    match outcome {
        BatchOutcome::Acknowledged => Ok(last),
        BatchOutcome::NotOwned => Err(LaneEnd::NotOwned),
        BatchOutcome::HandlerFailed {
            first,
            count,
            error,
        } => {
            // A failure that was not the handler's own is not its first attempt, nor is
            // one of a call that took several messages: which of them failed is unknown.
            let attempt = (count == 1 && error.counts()).then_some(error);
            let failed = first..first + count;
            recover(
                shared, partition, &positions, &envelopes, failed, attempt, stop,
            )
            .await
        }
        // With no handler in the batch, only the acknowledgement can have failed.
        BatchOutcome::StoreFailed(error) if error.is_infrastructure() || envelopes.is_empty() => {
            Err(LaneEnd::Outage(error.into()))
        }
        // A handler panicked: find it, and count it, one message at a time.
        BatchOutcome::StoreFailed(_) => {
            one_by_one(shared, partition, &positions, &envelopes, None, stop).await
        }
    }
}

/// Dead-letters a row that does not decode, with the decode error, and acknowledges it in
/// the same unit of work, so the partition moves on. Returns the position acknowledged.
async fn dead_letter_corrupt(
    shared: &Arc<Shared>,
    partition: i64,
    at: i64,
    error: String,
) -> Result<i64, LaneEnd> {
    tracing::error!(group = %shared.group, partition, position = at, %error, "a log row does not decode; dead-lettering it");
    let group = shared.group.clone();
    let acknowledge = acknowledge(shared.clone(), partition, at);
    let written = shared
        .db()
        .write(move |uow| {
            dead_letter::record_corrupt(uow, &group, at, &error)?;
            acknowledge(uow)
        })
        .await;
    match written {
        Ok(true) => {
            metrics::counter!(metric::DEAD_LETTERED, "group" => shared.group.to_string(), "message" => "(undecodable)")
                .increment(1);
            Ok(at)
        }
        Ok(false) => Err(LaneEnd::NotOwned),
        Err(error) => Err(LaneEnd::Outage(error.into())),
    }
}

/// After the handler call taking the messages `failed` of a batch failed: commits the
/// messages before them as a batch of their own, then delivers them one at a time, with
/// `attempt` counted as the first one's first attempt. The rest of the batch is read again.
/// Returns the position acknowledged.
async fn recover(
    shared: &Arc<Shared>,
    partition: i64,
    positions: &[i64],
    envelopes: &[Arc<Envelope>],
    failed: std::ops::Range<usize>,
    attempt: Option<HandlerError>,
    stop: &CancellationToken,
) -> Result<i64, LaneEnd> {
    if failed.start > 0 {
        let before = positions[failed.start - 1];
        let outcome = shared
            .dispatcher
            .deliver_batch(
                &envelopes[..failed.start],
                acknowledge(shared.clone(), partition, before),
            )
            .await;
        match outcome {
            BatchOutcome::Acknowledged => {}
            BatchOutcome::NotOwned => return Err(LaneEnd::NotOwned),
            BatchOutcome::StoreFailed(error) if error.is_infrastructure() => {
                return Err(LaneEnd::Outage(error.into()))
            }
            BatchOutcome::HandlerFailed { .. } | BatchOutcome::StoreFailed(_) => {
                return one_by_one(shared, partition, positions, envelopes, None, stop).await
            }
        }
    }
    one_by_one(
        shared,
        partition,
        &positions[failed.clone()],
        &envelopes[failed],
        attempt,
        stop,
    )
    .await
}

/// Delivers messages one at a time, with retries and dead letters, then acknowledges what was
/// done. `failed` is an earlier failed attempt of the first message.
async fn one_by_one(
    shared: &Arc<Shared>,
    partition: i64,
    positions: &[i64],
    envelopes: &[Arc<Envelope>],
    mut failed: Option<HandlerError>,
    stop: &CancellationToken,
) -> Result<i64, LaneEnd> {
    let mut handled = None;
    let mut stopped = false;
    for (at, envelope) in positions.iter().zip(envelopes) {
        if stop.is_cancelled() {
            stopped = true;
            break;
        }
        match shared
            .dispatcher
            .deliver(envelope.clone(), failed.take(), stop)
            .await
        {
            Outcome::Done => handled = Some(*at),
            Outcome::Stopped => {
                stopped = true;
                break;
            }
        }
    }
    let mut acknowledged = 0;
    if let Some(handled) = handled {
        match shared
            .db()
            .write(acknowledge(shared.clone(), partition, handled))
            .await
        {
            Ok(true) => acknowledged = handled,
            Ok(false) => return Err(LaneEnd::NotOwned),
            Err(error) => {
                tracing::warn!(%error, group = %shared.group, partition, "cannot acknowledge");
                stopped = pause(stop, ERROR_PAUSE).await || stopped;
            }
        }
    }
    if stopped {
        return Err(LaneEnd::Stopped);
    }
    Ok(acknowledged)
}

/// Sleeps for `duration`; true when stopped meanwhile.
pub(crate) async fn pause(stop: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(duration) => false,
    }
}

async fn offset(shared: &Shared, partition: i64) -> Result<i64, StoreError> {
    let group = shared.group.clone();
    shared
        .db()
        .read(move |conn| {
            let position = conn.query_opt(
                "SELECT position FROM conveyor_partitions \
                 WHERE group_name = ? AND \"partition\" = ?",
                (&*group, partition),
                |row| row.get(0),
            )?;
            Ok(position.unwrap_or(0))
        })
        .await
}

/// Moves the offset, but only while this member still owns the partition (a fence against a
/// consumer whose lease lapsed); the unit of work learns whether it did. A lane reading the
/// broker only checks the fence: the broker keeps its place, and `position` is the lane's
/// own count of deliveries.
pub(crate) fn acknowledge(
    shared: Arc<Shared>,
    partition: i64,
    position: i64,
) -> impl Fn(&mut UnitOfWork) -> Result<bool, StoreError> + Send + Sync + 'static {
    move |uow: &mut UnitOfWork| {
        if let Lanes::Broker(_) = shared.lanes {
            let owned = uow.conn().execute(
                "UPDATE conveyor_partitions SET owner = owner \
                 WHERE group_name = ? AND \"partition\" = ? AND owner = ?",
                (&*shared.group, partition, &shared.member),
            )?;
            return Ok(owned == 1);
        }
        let updated = uow.conn().execute(
            "UPDATE conveyor_partitions \
             SET position = CASE WHEN position < ? THEN ? ELSE position END \
             WHERE group_name = ? AND \"partition\" = ? AND owner = ?",
            (
                position,
                position,
                &*shared.group,
                partition,
                &shared.member,
            ),
        )?;
        Ok(updated == 1)
    }
}
