//! The MySQL/MariaDB arm: the portable conflict clauses become MySQL's (`INSERT IGNORE`,
//! `ON DUPLICATE KEY UPDATE c = VALUES(c)`), double quotes quote identifiers (the session runs
//! with `ANSI_QUOTES`), and affected rows count the rows a statement matched, as SQLite and
//! PostgreSQL count them (`CLIENT_FOUND_ROWS`): an acknowledgement that leaves an offset where
//! it was still proves the partition is owned.

use super::{Column, Error, Value, ValueRef};
use mysql::consts::CapabilityFlags;
use mysql::prelude::Queryable;
use mysql::{Opts, OptsBuilder, Row};
use std::borrow::Cow;
use std::time::Duration;

/// Prepared statements a connection keeps.
const STATEMENT_CACHE: usize = 256;
/// TCP keepalive: idle time before the first probe, then probes and their interval.
const KEEPALIVE_MS: u32 = 30_000;
const KEEPALIVE_PROBE_SECONDS: u32 = 10;
const KEEPALIVE_PROBES: u32 = 3;

pub(crate) struct MysqlSession {
    conn: mysql::Conn,
    /// The server's binary collation that does not pad with spaces, which DDL written with
    /// `utf8mb4_bin` gets instead, so that `'a'` and `'a '` differ as on the other backends.
    no_pad_collation: &'static str,
    /// MariaDB 10.5 and later: `INSERT … RETURNING`, which MySQL 8 does not have.
    insert_returning: bool,
}

impl MysqlSession {
    pub(crate) fn connect(url: &str, timeout: Duration) -> Result<MysqlSession, Error> {
        let url = url.replacen("mariadb://", "mysql://", 1);
        let opts = Opts::from_url(&url).map_err(mysql::Error::UrlError)?;
        let connect_timeout = opts.get_tcp_connect_timeout().or(Some(timeout));
        let opts = OptsBuilder::from_opts(opts)
            .tcp_connect_timeout(connect_timeout)
            // A half-open connection (a partition, a vanished host) fails in a minute or
            // so, instead of holding a writer until the kernel gives up.
            .tcp_keepalive_time_ms(Some(KEEPALIVE_MS))
            .tcp_keepalive_probe_interval_secs(Some(KEEPALIVE_PROBE_SECONDS))
            .tcp_keepalive_probe_count(Some(KEEPALIVE_PROBES))
            .stmt_cache_size(STATEMENT_CACHE)
            .additional_capabilities(CapabilityFlags::CLIENT_FOUND_ROWS)
            .init(vec![
                "SET SESSION sql_mode = \
                 CONCAT_WS(',', NULLIF(@@sql_mode, ''), 'ANSI_QUOTES', 'STRICT_ALL_TABLES')",
                "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            ]);
        let mut conn = mysql::Conn::new(opts)?;
        let version: String = conn.query_first("SELECT VERSION()")?.unwrap_or_default();
        let mariadb = version.contains("MariaDB");
        let no_pad_collation = if mariadb {
            "utf8mb4_nopad_bin"
        } else {
            "utf8mb4_0900_bin"
        };
        Ok(MysqlSession {
            conn,
            no_pad_collation,
            insert_returning: mariadb && major_minor(&version) >= (10, 5),
        })
    }

    pub(crate) fn has_insert_returning(&self) -> bool {
        self.insert_returning
    }

    /// Rows a statement returns are read and dropped: the error of a `SELECT` that fails
    /// after it started (a killed lock wait) arrives with them, and `exec_drop` loses it.
    pub(crate) fn execute(&mut self, sql: &str, values: &[Value<'_>]) -> Result<u64, Error> {
        let mut results = self.conn.exec_iter(translated(sql), params(values))?;
        while let Some(result) = results.iter() {
            for row in result {
                row?;
            }
        }
        drop(results);
        Ok(self.conn.affected_rows())
    }

    pub(crate) fn query(&mut self, sql: &str, values: &[Value<'_>]) -> Result<Vec<Row>, Error> {
        Ok(self.conn.exec(translated(sql), params(values))?)
    }

    /// Every statement's outcome is read: the server stops at the first that fails, and
    /// its error arrives with that statement's result, not the first one's.
    pub(crate) fn execute_batch(&mut self, sql: &str) -> Result<(), Error> {
        let sql = translated(sql).replace("utf8mb4_bin", self.no_pad_collation);
        let mut results = self.conn.query_iter(sql)?;
        while let Some(result) = results.iter() {
            for row in result {
                row?;
            }
        }
        Ok(())
    }

    pub(crate) fn last_insert_id(&self) -> u64 {
        self.conn.last_insert_id()
    }

    pub(crate) fn is_broken(&mut self) -> bool {
        self.conn.ping().is_err()
    }
}

fn params(values: &[Value<'_>]) -> mysql::Params {
    if values.is_empty() {
        return mysql::Params::Empty;
    }
    mysql::Params::Positional(
        values
            .iter()
            .map(|value| match *value {
                Value::Null => mysql::Value::NULL,
                Value::Int(value) => mysql::Value::Int(value),
                Value::Real(value) => mysql::Value::Double(value),
                Value::Text(value) => mysql::Value::Bytes(value.as_bytes().to_vec()),
                Value::Blob(value) => mysql::Value::Bytes(value.to_vec()),
            })
            .collect(),
    )
}

/// The major and minor numbers of a version such as `10.11.19-MariaDB-0+deb12u1`.
fn major_minor(version: &str) -> (u32, u32) {
    let mut numbers = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// The portable conflict clauses in MySQL's spelling; any other statement as it is.
fn translated(sql: &str) -> Cow<'_, str> {
    const CONFLICT: &str = " ON CONFLICT (";
    let Some(start) = sql.find(CONFLICT) else {
        return Cow::Borrowed(sql);
    };
    let Some(close) = sql[start..].find(')') else {
        return Cow::Borrowed(sql);
    };
    let (head, action) = (&sql[..start], sql[start + close + 1..].trim_start());
    if let Some(rest) = action.strip_prefix("DO NOTHING") {
        return Cow::Owned(format!(
            "{}{rest}",
            head.replacen("INSERT ", "INSERT IGNORE ", 1)
        ));
    }
    if let Some(assignments) = action.strip_prefix("DO UPDATE SET ") {
        let mut updates = String::with_capacity(assignments.len() + 16);
        let mut rest = assignments;
        while let Some(at) = rest.find("excluded.") {
            updates.push_str(&rest[..at]);
            let column = &rest[at + "excluded.".len()..];
            let end = column
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(column.len());
            updates.push_str(&format!("VALUES({})", &column[..end]));
            rest = &column[end..];
        }
        updates.push_str(rest);
        return Cow::Owned(format!("{head} ON DUPLICATE KEY UPDATE {updates}"));
    }
    Cow::Borrowed(sql)
}

pub(super) fn value<'a>(row: &'a Row, column: impl Column) -> Result<ValueRef<'a>, Error> {
    let names = row.columns_ref().iter().map(|column| column.name_str());
    let index = column
        .index_of(names, row.len())
        .ok_or_else(|| Error::corrupt(&column.to_string(), "no such column"))?;
    Ok(match row.as_ref(index) {
        None | Some(mysql::Value::NULL) => ValueRef::Null,
        Some(mysql::Value::Int(value)) => ValueRef::Int(*value),
        Some(mysql::Value::UInt(value)) => ValueRef::Int(
            i64::try_from(*value).map_err(|error| Error::corrupt(&column.to_string(), error))?,
        ),
        Some(mysql::Value::Float(value)) => ValueRef::Real(f64::from(*value)),
        Some(mysql::Value::Double(value)) => ValueRef::Real(*value),
        // Text and blobs both arrive as bytes.
        Some(mysql::Value::Bytes(bytes)) => match std::str::from_utf8(bytes) {
            Ok(text) => ValueRef::Text(text),
            Err(_) => ValueRef::Blob(bytes),
        },
        Some(other) => {
            return Err(Error::corrupt(
                &column.to_string(),
                format!("{other:?} is not a value the platform reads"),
            ))
        }
    })
}

/// Deadlocks, lock waits past `innodb_lock_wait_timeout`, and statements an administrator
/// interrupted (`KILL QUERY`): each fails the statement and leaves the session usable.
pub(super) fn is_conflict(error: &mysql::Error) -> bool {
    matches!(error, mysql::Error::MySqlError(server) if matches!(server.code, 1205 | 1213 | 1317))
}

/// Connection loss, a server going away, a full disk or table, lock waits and deadlocks.
pub(super) fn is_infrastructure(error: &mysql::Error) -> bool {
    use mysql::{DriverError, Error as E};
    match error {
        E::IoError(_) | E::CodecError(_) => true,
        E::DriverError(driver) => matches!(
            driver,
            DriverError::ConnectTimeout
                | DriverError::CouldNotConnect(_)
                | DriverError::Timeout
                | DriverError::PacketOutOfSync
        ),
        // Lock wait timeout, deadlock, query interrupted, table full, disk full, too many
        // connections, server shutting down, connection killed.
        E::MySqlError(server) => {
            matches!(
                server.code,
                1205 | 1213 | 1317 | 1114 | 1021 | 1040 | 1053 | 1927
            )
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{major_minor, translated};

    #[test]
    fn versions_read_as_major_and_minor() {
        assert_eq!(major_minor("10.11.19-MariaDB-0+deb12u1"), (10, 11));
        assert_eq!(major_minor("10.4.2-MariaDB"), (10, 4));
        assert_eq!(major_minor("8.0.36"), (8, 0));
        assert_eq!(major_minor("garbage"), (0, 0));
    }

    #[test]
    fn an_insert_or_ignore_keeps_its_returning_clause() {
        assert_eq!(
            translated("INSERT INTO t (a) VALUES (?), (?) ON CONFLICT (a) DO NOTHING RETURNING a"),
            "INSERT IGNORE INTO t (a) VALUES (?), (?) RETURNING a"
        );
    }

    #[test]
    fn conflict_clauses_are_spelt_the_mysql_way() {
        assert_eq!(
            translated("INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT (a) DO NOTHING"),
            "INSERT IGNORE INTO t (a, b) VALUES (?, ?)"
        );
        assert_eq!(
            translated(
                "INSERT INTO t (a, b, c) VALUES (?, ?, ?) \
                 ON CONFLICT (a) DO UPDATE SET b = excluded.b, c = excluded.c"
            ),
            "INSERT INTO t (a, b, c) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE b = VALUES(b), c = VALUES(c)"
        );
        assert_eq!(translated("SELECT 1"), "SELECT 1");
    }
}
