//! The PostgreSQL arm: `?` placeholders become `$1…$n`, values bind by the type the server
//! inferred for each placeholder (it refuses an `i64` for an `int4`), and prepared statements
//! are cached per connection, so a statement costs one round trip after its first use.
//!
//! The `postgres` client runs its own single-threaded runtime and panics when called from
//! a tokio worker: connections are used only on the platform's own threads and on blocking
//! threads.

use super::{Column, Error, Value, ValueRef};
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{IsNull, ToSql, Type};
use postgres::{Client, NoTls, Row, Statement};

use std::collections::HashMap;
use std::time::Duration;

/// Prepared statements a connection keeps; past this the cache starts over.
const STATEMENT_CACHE: usize = 256;

pub(crate) struct PgSession {
    client: Client,
    statements: HashMap<String, Statement>,
    /// The server said it ends the session (an administrator's `pg_terminate_backend`, a
    /// shutdown): the client may not have seen the socket close yet.
    ended: bool,
}

impl PgSession {
    pub(crate) fn connect(url: &str, timeout: Duration) -> Result<PgSession, Error> {
        let mut config: postgres::Config = url.parse()?;
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
        let mut client = config.connect(NoTls)?;
        // READ COMMITTED is PostgreSQL's default; said here because the platform's
        // conditional updates are written for it. Notices ("relation already exists,
        // skipping" on every start) would be logged line by line.
        client.batch_execute(
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED; \
             SET client_min_messages = warning",
        )?;
        Ok(PgSession {
            client,
            statements: HashMap::new(),
            ended: false,
        })
    }

    /// Notes an error that ends the session.
    fn noted<T>(&mut self, result: Result<T, postgres::Error>) -> Result<T, Error> {
        if let Err(error) = &result {
            self.ended |= ends_session(error);
        }
        Ok(result?)
    }

    fn prepare(&mut self, sql: &str) -> Result<Statement, Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let prepared = self.client.prepare(&numbered_placeholders(sql));
        let statement = self.noted(prepared)?;
        if self.statements.len() >= STATEMENT_CACHE {
            self.statements.clear();
        }
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    pub(crate) fn execute(&mut self, sql: &str, values: &[Value<'_>]) -> Result<u64, Error> {
        let statement = self.prepare(sql)?;
        let changed = self.client.execute(&statement, &bound(values));
        self.noted(changed)
    }

    pub(crate) fn query(&mut self, sql: &str, values: &[Value<'_>]) -> Result<Vec<Row>, Error> {
        let statement = self.prepare(sql)?;
        let rows = self.client.query(&statement, &bound(values));
        self.noted(rows)
    }

    pub(crate) fn execute_batch(&mut self, sql: &str) -> Result<(), Error> {
        let done = self.client.batch_execute(sql);
        self.noted(done)
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.ended || self.client.is_closed()
    }

    pub(crate) fn notifications(&mut self, wait: Duration) -> Result<Vec<String>, Error> {
        let mut payloads = Vec::new();
        let mut notifications = self.client.notifications();
        let first = notifications.timeout_iter(wait).next()?;
        if let Some(first) = first {
            payloads.push(first.payload().to_owned());
            let mut more = notifications.iter();
            while let Some(notification) = more.next()? {
                payloads.push(notification.payload().to_owned());
            }
        }
        Ok(payloads)
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

    postgres::types::to_sql_checked!();
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
pub(super) fn is_conflict(error: &postgres::Error) -> bool {
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
fn ends_session(error: &postgres::Error) -> bool {
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
pub(super) fn is_infrastructure(error: &postgres::Error) -> bool {
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
