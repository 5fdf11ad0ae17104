//! The PostgreSQL arm: `?` placeholders become `$1…$n`, values bind by the type the server
//! inferred for each placeholder (it refuses an `i64` for an `int4`), and prepared statements
//! are cached per connection, so a statement costs one round trip after its first use.
//!
//! A session is a `tokio-postgres` client on a single-threaded runtime of its own, driven
//! while a call blocks on it; it panics when called from a tokio worker, so connections are
//! used only on the platform's own threads and on blocking threads. The asynchronous client
//! is what lets a writer pipeline: a step whose answer can wait (`defer`) goes out with the
//! next statement, in the same flight, instead of costing a round trip of its own.

use super::{Column, Error, Value, ValueRef};
use futures::future::{self, Either};
use futures::FutureExt;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, Statement};

/// Prepared statements a connection keeps; past this the cache starts over.
const STATEMENT_CACHE: usize = 256;

pub(crate) struct PgSession {
    runtime: Runtime,
    client: Client,
    statements: HashMap<String, Statement>,
    /// Statements without parameters sent with the next request (`defer`).
    deferred: Option<String>,
    /// How the last deferred statements failed, until `take_deferred_error`.
    deferred_error: Option<Error>,
    /// How the statements sent ahead of the last request failed, until `take_ahead_error`.
    ahead_error: Option<Error>,
    /// The payloads of `NOTIFY`s, forwarded by the task that drives the connection.
    notifications: mpsc::UnboundedReceiver<String>,
    /// The server said it ends the session (an administrator's `pg_terminate_backend`, a
    /// shutdown): the client may not have seen the socket close yet.
    ended: bool,
}

impl PgSession {
    pub(crate) fn connect(url: &str, timeout: Duration) -> Result<PgSession, Error> {
        let mut config: tokio_postgres::Config = url.parse()?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeout);
        }
        // A half-open connection (a partition, a vanished host) fails in a minute or so,
        // instead of holding a writer until the kernel gives up.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(60));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| Error::Connection(format!("cannot start its runtime: {error}")))?;
        let (client, connection) = runtime.block_on(config.connect(NoTls))?;
        let (notify, notifications) = mpsc::unbounded_channel();
        runtime.spawn(drive(connection, notify));
        let mut session = PgSession {
            runtime,
            client,
            statements: HashMap::new(),
            deferred: None,
            deferred_error: None,
            ahead_error: None,
            notifications,
            ended: false,
        };
        // READ COMMITTED is PostgreSQL's default; said here because the platform's
        // conditional updates are written for it. Notices ("relation already exists,
        // skipping" on every start) would be logged line by line.
        session.execute_batch(
            &[],
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED; \
             SET client_min_messages = warning",
        )?;
        Ok(session)
    }

    /// Settles a flight (`in_flight`): keeps the deferred statements' failure for
    /// `take_deferred_error` and the statements' sent ahead for `take_ahead_error`, and
    /// notes an error that ends the session.
    fn settle<T>(&mut self, (deferred, ahead, result): Flight<T>) -> Result<T, Error> {
        if let Some(error) = deferred {
            self.ended |= ends_session(&error);
            self.deferred_error.get_or_insert(error.into());
        }
        if let Some(error) = ahead {
            self.ended |= ends_session(&error);
            self.ahead_error = Some(error.into());
        }
        if let Err(error) = &result {
            self.ended |= ends_session(error);
        }
        Ok(result?)
    }

    fn prepare(&mut self, sql: &str) -> Result<Statement, Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let numbered = numbered_placeholders(sql);
        let deferred = self.deferred.take();
        let flight = in_flight(
            &self.runtime,
            &self.client,
            deferred,
            &[],
            self.client.prepare(&numbered),
        );
        let statement = self.settle(flight)?;
        if self.statements.len() >= STATEMENT_CACHE {
            self.statements.clear();
        }
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// `statements`, prepared and bound, to send ahead of a request.
    fn prepare_ahead<'a>(&mut self, statements: Ahead<'a, '_>) -> Result<Prepared<'a>, Error> {
        statements
            .iter()
            .map(|(sql, values)| Ok((self.prepare(sql)?, bound(values))))
            .collect()
    }

    /// Each method that sends a request sends `ahead` before it, in the same flight:
    /// statements whose answers are only checked (`take_ahead_error`).
    pub(crate) fn execute(
        &mut self,
        ahead: Ahead<'_, '_>,
        sql: &str,
        values: &[Value<'_>],
    ) -> Result<u64, Error> {
        let statement = self.prepare(sql)?;
        let ahead = self.prepare_ahead(ahead)?;
        let values = bound(values);
        let deferred = self.deferred.take();
        let request = self.client.execute(&statement, &values);
        let flight = in_flight(&self.runtime, &self.client, deferred, &ahead, request);
        self.settle(flight)
    }

    /// Runs `statements` in one flight: each goes out before the first answer comes back.
    pub(crate) fn execute_all(&mut self, statements: Ahead<'_, '_>) -> Result<(), Error> {
        let ahead = self.prepare_ahead(statements)?;
        let deferred = self.deferred.take();
        let flight = in_flight(
            &self.runtime,
            &self.client,
            deferred,
            &ahead,
            future::ready(Ok(())),
        );
        self.settle(flight)?;
        self.take_ahead_error().map_or(Ok(()), Err)
    }

    /// A query; `then`, statements without parameters (a `COMMIT`), goes right behind it in
    /// the same flight, and its failure is the query's.
    pub(crate) fn query(
        &mut self,
        ahead: Ahead<'_, '_>,
        sql: &str,
        values: &[Value<'_>],
        then: Option<&str>,
    ) -> Result<Vec<Row>, Error> {
        let statement = self.prepare(sql)?;
        let ahead = self.prepare_ahead(ahead)?;
        let values = bound(values);
        let deferred = self.deferred.take();
        let then = match then {
            Some(steps) => Either::Left(self.client.batch_execute(steps)),
            None => Either::Right(future::ready(Ok(()))),
        };
        // `join` polls the query first: it is sent first.
        let request = future::join(self.client.query(&statement, &values), then)
            .map(|(rows, then)| rows.and_then(|rows| then.map(|()| rows)));
        let flight = in_flight(&self.runtime, &self.client, deferred, &ahead, request);
        self.settle(flight)
    }

    pub(crate) fn execute_batch(&mut self, ahead: Ahead<'_, '_>, sql: &str) -> Result<(), Error> {
        let ahead = self.prepare_ahead(ahead)?;
        let deferred = self.deferred.take();
        let flight = in_flight(
            &self.runtime,
            &self.client,
            deferred,
            &ahead,
            self.client.batch_execute(sql),
        );
        self.settle(flight)
    }

    /// Sends `sql`, statements without parameters, with the next request instead of now.
    pub(crate) fn defer(&mut self, sql: &str) {
        match &mut self.deferred {
            Some(steps) => {
                steps.push_str("; ");
                steps.push_str(sql);
            }
            None => self.deferred = Some(sql.to_owned()),
        }
    }

    /// How deferred statements sent since the last call failed, if they did.
    pub(crate) fn take_deferred_error(&mut self) -> Option<Error> {
        self.deferred_error.take()
    }

    /// How the statements sent ahead of the last request failed, if they did: then the
    /// transaction failed, and the request's own error says only that.
    pub(crate) fn take_ahead_error(&mut self) -> Option<Error> {
        self.ahead_error.take()
    }

    /// Drops deferred statements not sent yet, and the failure of those sent.
    pub(crate) fn forget_deferred(&mut self) {
        self.deferred = None;
        self.deferred_error = None;
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.ended || self.client.is_closed()
    }

    pub(crate) fn notifications(&mut self, wait: Duration) -> Result<Vec<String>, Error> {
        let notifications = &mut self.notifications;
        // The timer belongs to the session's runtime: made inside it.
        let first = self
            .runtime
            .block_on(async { tokio::time::timeout(wait, notifications.recv()).await });
        let mut payloads = Vec::new();
        match first {
            Err(_) => {}
            Ok(None) => return Err(Error::Connection("the connection closed".into())),
            Ok(Some(payload)) => {
                payloads.push(payload);
                while let Ok(payload) = self.notifications.try_recv() {
                    payloads.push(payload);
                }
            }
        }
        Ok(payloads)
    }
}

/// Statements to send ahead of a request, with their values.
pub(crate) type Ahead<'s, 'v> = &'s [(&'s str, &'s [Value<'v>])];

/// `Ahead` statements prepared, their values bound.
type Prepared<'a> = Vec<(Statement, Vec<&'a (dyn ToSql + Sync)>)>;

/// The deferred statements' failure, the failure of those sent ahead, and the request's
/// result.
type Flight<T> = (
    Option<tokio_postgres::Error>,
    Option<tokio_postgres::Error>,
    Result<T, tokio_postgres::Error>,
);

/// Runs `request` after `deferred` (when there are deferred statements) and `ahead`, in one
/// flight: all go out before any answer comes back, in that order (`join3` polls its
/// futures in order, `try_join_all` too, and a request is sent when first polled).
fn in_flight<T>(
    runtime: &Runtime,
    client: &Client,
    deferred: Option<String>,
    ahead: &[(Statement, Vec<&(dyn ToSql + Sync)>)],
    request: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Flight<T> {
    runtime.block_on(async {
        let steps = match &deferred {
            Some(steps) => Either::Left(client.batch_execute(steps)),
            None => Either::Right(future::ready(Ok(()))),
        };
        let ahead = future::try_join_all(
            ahead
                .iter()
                .map(|(statement, values)| client.execute(statement, values)),
        );
        let (stepped, sent_ahead, result) = future::join3(steps, ahead, request).await;
        (stepped.err(), sent_ahead.err(), result)
    })
}

/// Drives the connection while a call blocks on the session's runtime: sends requests,
/// routes answers, and forwards notifications. Ends with the connection.
async fn drive(
    mut connection: tokio_postgres::Connection<
        tokio_postgres::Socket,
        tokio_postgres::tls::NoTlsStream,
    >,
    notify: mpsc::UnboundedSender<String>,
) {
    loop {
        match future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(notification))) => {
                // Nobody listening (the session is gone) is nobody to tell.
                let _ = notify.send(notification.payload().to_owned());
            }
            Some(Ok(AsyncMessage::Notice(notice))) => tracing::info!(%notice, "PostgreSQL notice"),
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                tracing::debug!(%error, "the PostgreSQL connection ended");
                return;
            }
            None => return,
        }
    }
}

fn bound<'a>(values: &'a [Value<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    values
        .iter()
        .map(|value| value as &(dyn ToSql + Sync))
        .collect()
}

/// `?` → `$n`, left to right, except inside quoted literals and identifiers.
fn numbered_placeholders(sql: &str) -> String {
    let mut numbered = String::with_capacity(sql.len() + 16);
    let mut quote = None;
    let mut count = 0;
    for c in sql.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(open), _) if c == open => quote = None,
            (None, '?') => {
                count += 1;
                numbered.push('$');
                numbered.push_str(&count.to_string());
                continue;
            }
            _ => {}
        }
        numbered.push(c);
    }
    numbered
}

impl ToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(value) => match *ty {
                Type::INT8 => value.to_sql(ty, out),
                Type::INT4 => i32::try_from(value)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(value)?.to_sql(ty, out),
                Type::BOOL => (value != 0).to_sql(ty, out),
                Type::FLOAT8 => (value as f64).to_sql(ty, out),
                _ => Err(format!("an integer cannot bind to a {ty} parameter").into()),
            },
            Value::Real(value) => value.to_sql(ty, out),
            Value::Text(value) => value.to_sql(ty, out),
            Value::Blob(value) => value.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

pub(super) fn value<'a>(row: &'a Row, column: impl Column) -> Result<ValueRef<'a>, Error> {
    let names = row.columns().iter().map(|column| column.name());
    let index = column
        .index_of(names, row.len())
        .ok_or_else(|| Error::corrupt(&column.to_string(), "no such column"))?;
    let ty = row.columns()[index].type_().clone();
    let read = match ty {
        Type::BOOL => row
            .try_get::<_, Option<bool>>(index)
            .map(|value| value.map(|value| ValueRef::Int(value.into()))),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(index)
            .map(|value| value.map(|value| ValueRef::Int(value.into()))),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(index)
            .map(|value| value.map(|value| ValueRef::Int(value.into()))),
        Type::INT8 => row
            .try_get::<_, Option<i64>>(index)
            .map(|value| value.map(ValueRef::Int)),
        Type::FLOAT8 => row
            .try_get::<_, Option<f64>>(index)
            .map(|value| value.map(ValueRef::Real)),
        Type::BYTEA => row
            .try_get::<_, Option<&[u8]>>(index)
            .map(|value| value.map(ValueRef::Blob)),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => row
            .try_get::<_, Option<&str>>(index)
            .map(|value| value.map(ValueRef::Text)),
        other => {
            return Err(Error::corrupt(
                &column.to_string(),
                format!("type {other} is not one the platform reads"),
            ))
        }
    };
    Ok(read?.unwrap_or(ValueRef::Null))
}

/// Deadlocks, serialization failures, lock waits past `lock_timeout`, and cancelled
/// statements. The platform cancels none of its own, yet CI saw a writer's statement
/// "cancelled due to user request" under lock contention, with nobody cancelling: the
/// signal PostgreSQL's lock timeout sends its own backend can land on the next statement.
/// An administrator's `pg_cancel_backend` is answered the same way: the unit runs again.
pub(super) fn is_conflict(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|code| {
        [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::QUERY_CANCELED,
        ]
        .contains(code)
    })
}

/// The connection is gone, or the server ends the session: an administrator's or a
/// shutdown's `57P01`–`57P03` (sent just before the socket closes) or a connection error.
fn ends_session(error: &tokio_postgres::Error) -> bool {
    error.is_closed()
        || error.code().is_some_and(|code| {
            code.code().starts_with("08")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                ]
                .contains(code)
        })
}

/// Connection loss, a server shutting down, a full disk, lock conflicts and deadlocks.
pub(super) fn is_infrastructure(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    let Some(code) = error.code() else {
        // No SQLSTATE: the connection or its socket failed, or a value did not convert.
        return std::error::Error::source(error)
            .is_some_and(|source| source.is::<std::io::Error>());
    };
    let class = &code.code()[..2];
    matches!(class, "08" | "53" | "57" | "58")
        || [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
        ]
        .contains(code)
}

#[cfg(test)]
mod tests {
    use super::numbered_placeholders;

    #[test]
    fn placeholders_are_numbered_outside_quotes() {
        assert_eq!(
            numbered_placeholders("SELECT '?', \"a?\" FROM t WHERE a = ? AND b IN (?, ?)"),
            "SELECT '?', \"a?\" FROM t WHERE a = $1 AND b IN ($2, $3)"
        );
    }
}
