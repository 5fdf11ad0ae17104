//! The SQL every store speaks: one connection type over SQLite, PostgreSQL and MySQL/MariaDB.
//!
//! Stores, use cases and handlers write their statements once, in a portable subset (see
//! `docs/architecture.md`, "Portable storage"): `?` placeholders, `INSERT … ON CONFLICT (…)
//! DO NOTHING` and `ON CONFLICT (…) DO UPDATE SET c = excluded.c`, identifiers that need
//! quoting in double quotes. Each backend's module turns that subset into its own dialect,
//! once per statement, and caches the prepared result: PostgreSQL numbers the placeholders,
//! MySQL spells the conflict clauses its way. That translation is the only place dialects
//! differ; what cannot be translated (DDL, the log's counter) is chosen by `Backend`.
//!
//! The SQLite arm is rusqlite itself, with its statement cache: nothing new runs per
//! statement there, so the embedded default is as fast as it was.

mod held;
mod mysql;
mod postgres;
mod temporary;

use std::cell::{Cell, RefCell};
use std::fmt;

pub(crate) use self::held::Mark as HeldMark;
pub(crate) use self::mysql::MysqlSession;
pub(crate) use self::postgres::PgSession;
pub use self::temporary::TemporaryDatabase;

/// Which database a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Mysql,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::Mysql => "MySQL",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", postgres_message(.0))]
    Postgres(#[from] ::tokio_postgres::Error),
    #[error(transparent)]
    Mysql(#[from] ::mysql::Error),
    #[error("the query returned no row")]
    NoRow,
    /// A server connection that failed outside any statement (its runtime, its socket).
    #[error("database connection: {0}")]
    Connection(String),
    /// A stored value that is not what its column should hold: the data is corrupt (or was
    /// written by a newer version), not the query.
    #[error("column {column}: {message}")]
    Column { column: String, message: String },
    #[error("cannot encode {what}: {message}")]
    Encode { what: &'static str, message: String },
    /// Only the scheme: a URL may carry a password.
    #[error("unsupported database `{0}`: expected postgres://… or mysql://…")]
    Url(String),
}

/// The server's own words: the driver's `Display` says only "db error".
fn postgres_message(error: &::tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{db} (SQLSTATE {})", db.code().code()),
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

impl Error {
    fn url(url: &str) -> Error {
        Error::Url(url.split(':').next().unwrap_or_default().to_owned())
    }

    /// A stored value that does not decode.
    pub fn corrupt(column: &str, error: impl fmt::Display) -> Error {
        Error::Column {
            column: column.to_owned(),
            message: error.to_string(),
        }
    }

    /// Did the statement lose a race for a row lock (a deadlock, a serialization failure, a
    /// lock wait that timed out)? Nothing is wrong with the work: running it again will do.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Postgres(error) => postgres::is_conflict(error),
            Error::Mysql(error) => mysql::is_conflict(error),
            _ => false,
        }
    }

    /// Is this a failure of the database itself (full, busy, unreachable, deadlocked) rather
    /// than of the statement? Such failures say nothing about the work: trying it again once
    /// the database recovers will do.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            Error::Sqlite(error) => {
                use rusqlite::ErrorCode;
                matches!(
                    error.sqlite_error_code(),
                    Some(
                        ErrorCode::DiskFull
                            | ErrorCode::DatabaseBusy
                            | ErrorCode::DatabaseLocked
                            | ErrorCode::SystemIoFailure
                            | ErrorCode::CannotOpen
                            | ErrorCode::OutOfMemory
                            | ErrorCode::ReadOnly
                    )
                )
            }
            Error::Postgres(error) => postgres::is_infrastructure(error),
            Error::Mysql(error) => mysql::is_infrastructure(error),
            Error::Connection(_) => true,
            Error::NoRow | Error::Column { .. } | Error::Encode { .. } | Error::Url(_) => false,
        }
    }
}

/// A value bound to a statement's placeholder, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// A type that binds to a placeholder.
pub trait ToValue {
    fn to_value(&self) -> Value<'_>;
}

macro_rules! int_to_value {
    ($($int:ty),*) => {$(
        impl ToValue for $int {
            fn to_value(&self) -> Value<'_> {
                Value::Int(i64::from(*self))
            }
        }
    )*};
}
int_to_value!(i64, i32, u32, i16, u16, u8, bool);

impl ToValue for f64 {
    fn to_value(&self) -> Value<'_> {
        Value::Real(*self)
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}

impl ToValue for std::sync::Arc<str> {
    fn to_value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value<'_> {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value<'_> {
        (**self).to_value()
    }
}

/// The values of a statement's placeholders, in order: a tuple, an array or a slice.
pub trait Params {
    fn values(&self) -> Vec<Value<'_>>;
}

impl Params for () {
    fn values(&self) -> Vec<Value<'_>> {
        Vec::new()
    }
}

impl<T: ToValue, const N: usize> Params for [T; N] {
    fn values(&self) -> Vec<Value<'_>> {
        self.iter().map(ToValue::to_value).collect()
    }
}

impl Params for &[Value<'_>] {
    fn values(&self) -> Vec<Value<'_>> {
        self.to_vec()
    }
}

impl Params for &[&dyn ToValue] {
    fn values(&self) -> Vec<Value<'_>> {
        self.iter().map(|value| value.to_value()).collect()
    }
}

macro_rules! tuple_params {
    ($($name:ident),+) => {
        impl<$($name: ToValue),+> Params for ($($name,)+) {
            #[allow(non_snake_case)]
            fn values(&self) -> Vec<Value<'_>> {
                let ($($name,)+) = self;
                vec![$($name.to_value()),+]
            }
        }
    };
}
tuple_params!(A);
tuple_params!(A, B);
tuple_params!(A, B, C);
tuple_params!(A, B, C, D);
tuple_params!(A, B, C, D, E);
tuple_params!(A, B, C, D, E, F);
tuple_params!(A, B, C, D, E, F, G);
tuple_params!(A, B, C, D, E, F, G, H);
tuple_params!(A, B, C, D, E, F, G, H, I);
tuple_params!(A, B, C, D, E, F, G, H, I, J);
tuple_params!(A, B, C, D, E, F, G, H, I, J, K);
tuple_params!(A, B, C, D, E, F, G, H, I, J, K, L);

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Value::Null => ValueRef::Null,
            Value::Int(value) => ValueRef::Integer(value),
            Value::Real(value) => ValueRef::Real(value),
            Value::Text(value) => ValueRef::Text(value.as_bytes()),
            Value::Blob(value) => ValueRef::Blob(value),
        }))
    }
}

/// A value read from a row, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub enum ValueRef<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// A type that a column's value converts to.
pub trait FromValue: Sized {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Int(value) => Ok(value),
            // MySQL hands out some sums and decimals as text.
            ValueRef::Text(text) => text
                .parse()
                .map_err(|_| format!("{text:?} is not an integer")),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}

impl FromValue for i32 {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        let wide = i64::from_value(value)?;
        i32::try_from(wide).map_err(|_| format!("{wide} is out of range"))
    }
}

impl FromValue for u32 {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        let wide = i64::from_value(value)?;
        u32::try_from(wide).map_err(|_| format!("{wide} is out of range"))
    }
}

impl FromValue for bool {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        i64::from_value(value).map(|value| value != 0)
    }
}

impl FromValue for f64 {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Real(value) => Ok(value),
            ValueRef::Int(value) => Ok(value as f64),
            other => Err(format!("expected a number, found {other:?}")),
        }
    }
}

impl FromValue for String {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Text(text) => Ok(text.to_owned()),
            ValueRef::Blob(bytes) => {
                String::from_utf8(bytes.to_vec()).map_err(|error| format!("not UTF-8: {error}"))
            }
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}

impl FromValue for uuid::Uuid {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        value.text()?.parse().map_err(|error| format!("{error}"))
    }
}

impl<'a> ValueRef<'a> {
    /// The text of a text value, borrowed (MySQL hands some text out as bytes).
    pub fn text(self) -> Result<&'a str, String> {
        match self {
            ValueRef::Text(text) => Ok(text),
            ValueRef::Blob(bytes) => {
                std::str::from_utf8(bytes).map_err(|error| format!("not UTF-8: {error}"))
            }
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Blob(bytes) => Ok(bytes.to_vec()),
            ValueRef::Text(text) => Ok(text.as_bytes().to_vec()),
            other => Err(format!("expected bytes, found {other:?}")),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Null => Ok(None),
            value => T::from_value(value).map(Some),
        }
    }
}

/// A column of a row, by position or by name.
pub trait Column: rusqlite::RowIndex + fmt::Display + Copy {
    /// Where the column is among `names`, the row's `len` columns.
    fn index_of<S: AsRef<str>>(
        self,
        names: impl IntoIterator<Item = S>,
        len: usize,
    ) -> Option<usize>;
}

impl Column for usize {
    fn index_of<S: AsRef<str>>(self, _: impl IntoIterator<Item = S>, len: usize) -> Option<usize> {
        (self < len).then_some(self)
    }
}

impl Column for &str {
    fn index_of<S: AsRef<str>>(
        self,
        names: impl IntoIterator<Item = S>,
        _: usize,
    ) -> Option<usize> {
        names.into_iter().position(|name| name.as_ref() == self)
    }
}

/// One row of a result.
pub struct Row<'a>(RowKind<'a>);

enum RowKind<'a> {
    Sqlite(&'a rusqlite::Row<'a>),
    Postgres(&'a ::tokio_postgres::Row),
    Mysql(&'a ::mysql::Row),
}

impl Row<'_> {
    /// The value of `column`, converted; a value that does not convert is `Error::Column`.
    pub fn get<T: FromValue>(&self, column: impl Column) -> Result<T, Error> {
        let converted = match &self.0 {
            RowKind::Sqlite(row) => T::from_value(sqlite_value(row.get_ref(column)?)?),
            RowKind::Postgres(row) => T::from_value(postgres::value(row, column)?),
            RowKind::Mysql(row) => T::from_value(mysql::value(row, column)?),
        };
        converted.map_err(|message| Error::Column {
            column: column.to_string(),
            message,
        })
    }
}

fn sqlite_value(value: rusqlite::types::ValueRef<'_>) -> Result<ValueRef<'_>, Error> {
    use rusqlite::types::ValueRef as Sqlite;
    Ok(match value {
        Sqlite::Null => ValueRef::Null,
        Sqlite::Integer(value) => ValueRef::Int(value),
        Sqlite::Real(value) => ValueRef::Real(value),
        Sqlite::Text(bytes) => ValueRef::Text(
            std::str::from_utf8(bytes).map_err(|error| Error::corrupt("text", error))?,
        ),
        Sqlite::Blob(bytes) => ValueRef::Blob(bytes),
    })
}

/// A connection, or the open transaction of a unit of work: what stores run statements on.
pub struct Conn {
    kind: ConnKind,
    /// Set when a statement failed on a lock conflict (a deadlock, a lock wait that timed
    /// out): the unit that ran it is worth running again.
    conflicted: Cell<bool>,
    /// Set when a statement ran on a server: a unit that ran none has nothing in its
    /// savepoint, so the writer skips the round trip that would end it.
    ran: Cell<bool>,
    /// Rows a server's writer holds back to insert with other units' (see `held`).
    held: RefCell<held::HeldRows>,
}

enum ConnKind {
    Sqlite(rusqlite::Connection),
    // Boxed: a server session is several times a SQLite connection's size.
    Postgres(Box<RefCell<PgSession>>),
    Mysql(Box<RefCell<MysqlSession>>),
}

impl Conn {
    fn of(kind: ConnKind) -> Conn {
        Conn {
            kind,
            conflicted: Cell::new(false),
            ran: Cell::new(false),
            held: RefCell::default(),
        }
    }

    /// Runs a MySQL statement, after writing the rows held back before it (see `held`).
    fn on_mysql<T>(&self, statement: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        self.write_held()?;
        self.noted(statement())
    }

    /// Runs a PostgreSQL request with the rows held back before it sent ahead of it, in the
    /// same flight (see `held`). A request that fails before its flight (a statement that
    /// does not prepare) has failed the transaction too: no unit commits without the rows.
    fn on_postgres<T>(
        &self,
        session: &RefCell<PgSession>,
        request: impl FnOnce(&mut PgSession, postgres::Ahead<'_, '_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut held = self.held.borrow_mut();
        if !held.is_pending() {
            drop(held);
            return self.noted(request(&mut session.borrow_mut(), &[]));
        }
        let pending = held.pending();
        let ahead: Vec<(&str, &[Value<'_>])> = pending
            .iter()
            .map(|merged| (merged.sql.as_str(), merged.values.as_slice()))
            .collect();
        let mut session = session.borrow_mut();
        let result = request(&mut session, &ahead);
        let failed = session.take_ahead_error();
        drop(ahead);
        drop(pending);
        match failed {
            Some(error) => {
                held.failed = Some(error.to_string());
                self.noted(Err(error))
            }
            None => {
                held.written();
                self.noted(result)
            }
        }
    }

    /// Writes the rows held back, one multi-row `INSERT` per statement.
    pub(crate) fn write_held(&self) -> Result<(), Error> {
        let mut held = self.held.borrow_mut();
        if !held.is_pending() {
            return Ok(());
        }
        let pending = held.pending();
        let written = match &self.kind {
            // In one flight: the statements' answers are only checked.
            ConnKind::Postgres(session) => {
                let statements: Vec<(&str, &[Value<'_>])> = pending
                    .iter()
                    .map(|merged| (merged.sql.as_str(), merged.values.as_slice()))
                    .collect();
                self.noted(session.borrow_mut().execute_all(&statements))
            }
            ConnKind::Mysql(session) => pending.iter().try_for_each(|merged| {
                let changed = session.borrow_mut().execute(&merged.sql, &merged.values);
                self.noted(changed).map(drop)
            }),
            // Unreached: SQLite never holds rows (`hold_rows`).
            ConnKind::Sqlite(conn) => pending.iter().try_for_each(|merged| {
                conn.prepare_cached(&merged.sql)?
                    .execute(rusqlite::params_from_iter(merged.values.iter()))?;
                Ok(())
            }),
        };
        drop(pending);
        match &written {
            Ok(()) => held.written(),
            Err(error) => held.failed = Some(error.to_string()),
        }
        written
    }

    /// Inserts one row with `sql`, a single-row `INSERT … VALUES (?, …)`, now or, on a
    /// server's writer, together with other units' rows (see `UnitOfWork::insert`).
    pub(crate) fn insert(&self, sql: &'static str, params: impl Params) -> Result<(), Error> {
        let values = params.values();
        let Some(values) = self.held.borrow_mut().hold(sql, values) else {
            if self.held.borrow().is_full() {
                return self.write_held();
            }
            return Ok(());
        };
        self.execute(sql, values.as_slice()).map(drop)
    }

    /// Whether `insert` holds rows back from here on; never on SQLite, whose statements
    /// cost no round trip.
    pub(crate) fn hold_rows(&self, holding: bool) {
        self.held.borrow_mut().holding = holding && self.backend() != Backend::Sqlite;
    }

    pub(crate) fn held_mark(&self) -> HeldMark {
        self.held.borrow().mark()
    }

    /// A unit that started at `mark` rolled back: see `HeldRows::roll_back_to`.
    pub(crate) fn roll_back_held(&self, mark: HeldMark) {
        self.held.borrow_mut().roll_back_to(mark);
    }

    /// How writing held rows failed, if it did: then the batch's units run again alone.
    pub(crate) fn held_failure(&self) -> Option<String> {
        self.held.borrow().failed.clone()
    }

    /// Forgets the held rows: the transaction ended.
    pub(crate) fn clear_held(&self) {
        self.held.borrow_mut().clear();
    }

    /// Notes that a server statement ran, and whether it failed on a lock conflict.
    fn noted<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        self.ran.set(true);
        if result.as_ref().is_err_and(Error::is_conflict) {
            self.conflicted.set(true);
        }
        result
    }

    /// Did a statement fail on a lock conflict since `reset_marks`?
    pub(crate) fn had_conflict(&self) -> bool {
        self.conflicted.get()
    }

    /// Did a server statement run since `reset_marks`?
    pub(crate) fn ran_statements(&self) -> bool {
        self.ran.get()
    }

    pub(crate) fn reset_marks(&self) {
        self.conflicted.set(false);
        self.ran.set(false);
    }

    pub(crate) fn sqlite(conn: rusqlite::Connection) -> Conn {
        Conn::of(ConnKind::Sqlite(conn))
    }

    pub(crate) fn postgres(session: PgSession) -> Conn {
        Conn::of(ConnKind::Postgres(Box::new(RefCell::new(session))))
    }

    pub(crate) fn mysql(session: MysqlSession) -> Conn {
        Conn::of(ConnKind::Mysql(Box::new(RefCell::new(session))))
    }

    pub fn backend(&self) -> Backend {
        match self.kind {
            ConnKind::Sqlite(_) => Backend::Sqlite,
            ConnKind::Postgres(_) => Backend::Postgres,
            ConnKind::Mysql(_) => Backend::Mysql,
        }
    }

    /// The SQLite connection underneath, for what only SQLite has (its pragmas, hooks).
    pub(crate) fn as_sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.kind {
            ConnKind::Sqlite(conn) => Some(conn),
            _ => None,
        }
    }

    /// Runs one statement; returns how many rows it changed (on MySQL: matched).
    pub fn execute(&self, sql: &str, params: impl Params) -> Result<u64, Error> {
        let values = params.values();
        match &self.kind {
            ConnKind::Sqlite(conn) => {
                let changed = conn
                    .prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(values.iter()))?;
                Ok(changed as u64)
            }
            ConnKind::Postgres(session) => self.on_postgres(session, |session, ahead| {
                session.execute(ahead, sql, &values)
            }),
            ConnKind::Mysql(session) => {
                self.on_mysql(|| session.borrow_mut().execute(sql, &values))
            }
        }
    }

    /// Creates the empty table `copy` with `table`'s columns, keys and indexes. SQLite has
    /// no `CREATE TABLE … LIKE`: its copy replays `table`'s own DDL with the name replaced
    /// (index names that start with it too, so they stay unique).
    pub fn create_table_like(&self, copy: &str, table: &str) -> Result<(), Error> {
        match self.backend() {
            Backend::Postgres => {
                self.execute_batch(&format!("CREATE TABLE {copy} (LIKE {table} INCLUDING ALL)"))
            }
            Backend::Mysql => self.execute_batch(&format!("CREATE TABLE {copy} LIKE {table}")),
            Backend::Sqlite => {
                // 'table' sorts after 'index': the table is created before its indexes.
                let definitions: Vec<String> = self.query_map(
                    "SELECT sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL \
                     ORDER BY type DESC",
                    [table],
                    |row| row.get(0),
                )?;
                if definitions.is_empty() {
                    return Err(Error::corrupt(table, "no such table to copy"));
                }
                for definition in definitions {
                    self.execute_batch(&definition.replace(table, copy))?;
                }
                Ok(())
            }
        }
    }

    /// Runs statements that take no parameters, separated by semicolons, in one round trip.
    pub fn execute_batch(&self, sql: &str) -> Result<(), Error> {
        match &self.kind {
            ConnKind::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            ConnKind::Postgres(session) => {
                self.on_postgres(session, |session, ahead| session.execute_batch(ahead, sql))
            }
            ConnKind::Mysql(session) => self.on_mysql(|| session.borrow_mut().execute_batch(sql)),
        }
    }

    /// Every row of a query, each converted by `row`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: impl Params,
        mut row: impl FnMut(&Row<'_>) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        let values = params.values();
        match &self.kind {
            ConnKind::Sqlite(conn) => {
                let mut statement = conn.prepare_cached(sql)?;
                let mut rows = statement.query(rusqlite::params_from_iter(values.iter()))?;
                let mut converted = Vec::new();
                while let Some(found) = rows.next()? {
                    converted.push(row(&Row(RowKind::Sqlite(found)))?);
                }
                Ok(converted)
            }
            ConnKind::Postgres(session) => self
                .on_postgres(session, |session, ahead| {
                    session.query(ahead, sql, &values, None)
                })?
                .iter()
                .map(|found| row(&Row(RowKind::Postgres(found))))
                .collect(),
            ConnKind::Mysql(session) => self
                .on_mysql(|| session.borrow_mut().query(sql, &values))?
                .iter()
                .map(|found| row(&Row(RowKind::Mysql(found))))
                .collect(),
        }
    }

    /// The first row of a query, if there is one.
    pub fn query_opt<T>(
        &self,
        sql: &str,
        params: impl Params,
        row: impl FnOnce(&Row<'_>) -> Result<T, Error>,
    ) -> Result<Option<T>, Error> {
        let values = params.values();
        match &self.kind {
            ConnKind::Sqlite(conn) => {
                let mut statement = conn.prepare_cached(sql)?;
                let mut rows = statement.query(rusqlite::params_from_iter(values.iter()))?;
                rows.next()?
                    .map(|found| row(&Row(RowKind::Sqlite(found))))
                    .transpose()
            }
            ConnKind::Postgres(session) => self
                .on_postgres(session, |session, ahead| {
                    session.query(ahead, sql, &values, None)
                })?
                .first()
                .map(|found| row(&Row(RowKind::Postgres(found))))
                .transpose(),
            ConnKind::Mysql(session) => self
                .on_mysql(|| session.borrow_mut().query(sql, &values))?
                .first()
                .map(|found| row(&Row(RowKind::Mysql(found))))
                .transpose(),
        }
    }

    /// The first row of a query; `Error::NoRow` when there is none.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: impl Params,
        row: impl FnOnce(&Row<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.query_opt(sql, params, row)?.ok_or(Error::NoRow)
    }

    /// The first column of the first row.
    pub fn scalar<T: FromValue>(&self, sql: &str, params: impl Params) -> Result<T, Error> {
        self.query_row(sql, params, |row| row.get(0))
    }

    /// `scalar`, then `then`, statements without parameters (a `COMMIT`): on PostgreSQL sent
    /// right behind the query, in its flight, so that `then` costs no round trip of its own.
    pub(crate) fn scalar_then<T: FromValue>(
        &self,
        sql: &str,
        params: impl Params,
        then: &str,
    ) -> Result<T, Error> {
        let ConnKind::Postgres(session) = &self.kind else {
            let value = self.scalar(sql, params)?;
            self.execute_batch(then)?;
            return Ok(value);
        };
        let values = params.values();
        let rows = self.on_postgres(session, |session, ahead| {
            session.query(ahead, sql, &values, Some(then))
        })?;
        rows.first()
            .ok_or(Error::NoRow)
            .and_then(|found| Row(RowKind::Postgres(found)).get(0))
    }

    /// Runs `reads` in one read-only transaction, so every query in it sees the same
    /// committed state. On a unit of work's connection, use the unit itself instead.
    pub fn snapshot<T, E: From<Error>>(
        &self,
        reads: impl FnOnce(&Conn) -> Result<T, E>,
    ) -> Result<T, E> {
        let begin = match self.backend() {
            Backend::Sqlite => "BEGIN",
            Backend::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            // The session reads committed; the next transaction alone repeats its reads.
            Backend::Mysql => {
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; \
                 START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY"
            }
        };
        self.execute_batch(begin)?;
        let result = reads(self);
        // Nothing was written: ending the snapshot either way is the same.
        let ended = self.execute_batch(if result.is_ok() { "COMMIT" } else { "ROLLBACK" });
        let value = result?;
        ended?;
        Ok(value)
    }

    /// `execute_batch`, except that PostgreSQL sends `sql` with the next statement, in the
    /// same flight, rather than waiting for its answer now: how it went comes back from
    /// `take_deferred_error`. For steps whose failure only the end of a batch acts on.
    /// Rows held back stay held: a savepoint step leaves them as they are.
    pub(crate) fn defer(&self, sql: &str) -> Result<(), Error> {
        match &self.kind {
            ConnKind::Postgres(session) => {
                session.borrow_mut().defer(sql);
                Ok(())
            }
            ConnKind::Mysql(session) => self.noted(session.borrow_mut().execute_batch(sql)),
            ConnKind::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
        }
    }

    /// How deferred statements failed, if those sent so far did.
    pub(crate) fn take_deferred_error(&self) -> Option<Error> {
        match &self.kind {
            ConnKind::Postgres(session) => session.borrow_mut().take_deferred_error(),
            _ => None,
        }
    }

    /// Drops what is deferred: for a transaction about to be rolled back.
    pub(crate) fn forget_deferred(&self) {
        if let ConnKind::Postgres(session) = &self.kind {
            session.borrow_mut().forget_deferred();
        }
    }

    /// Does the server have `INSERT … RETURNING` (all but MySQL, and MariaDB before 10.5)?
    pub(crate) fn has_insert_returning(&self) -> bool {
        match &self.kind {
            ConnKind::Mysql(session) => session.borrow().has_insert_returning(),
            ConnKind::Sqlite(_) | ConnKind::Postgres(_) => true,
        }
    }

    /// Is the connection outside a transaction? Only SQLite can tell without a round trip;
    /// a server's connection reports an abandoned transaction through its next statement.
    pub(crate) fn is_autocommit(&self) -> bool {
        self.as_sqlite()
            .is_some_and(rusqlite::Connection::is_autocommit)
    }

    /// Is the connection gone for good (the server closed it), so that a new one is needed?
    pub(crate) fn is_broken(&self) -> bool {
        match &self.kind {
            ConnKind::Sqlite(_) => false,
            ConnKind::Postgres(session) => session.borrow().is_broken(),
            ConnKind::Mysql(session) => session.borrow_mut().is_broken(),
        }
    }

    /// Has the connection been seen to close, without asking the server? Only PostgreSQL's
    /// client can tell; `is_broken` asks MySQL's.
    pub(crate) fn seen_closed(&self) -> bool {
        match &self.kind {
            ConnKind::Postgres(session) => session.borrow().is_broken(),
            ConnKind::Sqlite(_) | ConnKind::Mysql(_) => false,
        }
    }

    /// SQLite's rowid of the last row inserted on this connection.
    pub(crate) fn last_insert_rowid(&self) -> Option<i64> {
        self.as_sqlite()
            .map(rusqlite::Connection::last_insert_rowid)
    }

    /// MySQL's own idea of the last auto-increment value, as set by `LAST_INSERT_ID(expr)`.
    pub(crate) fn mysql_last_insert_id(&self) -> Option<u64> {
        match &self.kind {
            ConnKind::Mysql(session) => Some(session.borrow().last_insert_id()),
            _ => None,
        }
    }

    /// Takes the notifications PostgreSQL delivered to this connection, waiting up to
    /// `wait` for the first; the payloads.
    pub(crate) fn postgres_notifications(
        &self,
        wait: std::time::Duration,
    ) -> Result<Vec<String>, Error> {
        match &self.kind {
            ConnKind::Postgres(session) => session.borrow_mut().notifications(wait),
            _ => Ok(Vec::new()),
        }
    }
}

/// A connection of its own to the PostgreSQL or MySQL/MariaDB database at `url`, set up as
/// the platform sets up its own. Blocks: use it off the runtime.
pub fn connect(url: &str) -> Result<Conn, Error> {
    ServerUrl::parse(url)
        .ok_or_else(|| Error::url(url))?
        .connect()
}

/// Where a server database is, parsed from a `postgres://` or `mysql://` URL.
#[derive(Clone)]
pub(crate) struct ServerUrl {
    server: Server,
    url: String,
}

#[derive(Debug, Clone, Copy)]
enum Server {
    Postgres,
    Mysql,
}

/// How long connecting to a server may take before it counts as unreachable.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl ServerUrl {
    pub(crate) fn parse(url: &str) -> Option<ServerUrl> {
        let server = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Server::Postgres
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Server::Mysql
        } else {
            return None;
        };
        Some(ServerUrl {
            server,
            url: url.to_owned(),
        })
    }

    pub(crate) fn backend(&self) -> Backend {
        match self.server {
            Server::Postgres => Backend::Postgres,
            Server::Mysql => Backend::Mysql,
        }
    }

    /// A new connection, set up the way every connection of the platform is.
    pub(crate) fn connect(&self) -> Result<Conn, Error> {
        match self.server {
            Server::Postgres => PgSession::connect(&self.url, CONNECT_TIMEOUT).map(Conn::postgres),
            Server::Mysql => MysqlSession::connect(&self.url, CONNECT_TIMEOUT).map(Conn::mysql),
        }
    }
}

impl fmt::Debug for ServerUrl {
    /// The URL with its password masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, rest) = self.url.split_once("://").unwrap_or(("", &self.url));
        match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                let masked = if user.len() < userinfo.len() {
                    ":***"
                } else {
                    ""
                };
                write!(f, "{scheme}://{user}{masked}@{host}")
            }
            None => f.write_str(&self.url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ServerUrl;

    #[test]
    fn a_server_url_shows_without_its_password() {
        let shown = |url| format!("{:?}", ServerUrl::parse(url).expect("a server URL"));
        assert_eq!(
            shown("postgres://u:hunter2@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(shown("mysql://root@h/db"), "mysql://root@h/db");
        assert_eq!(shown("mysql://h/db"), "mysql://h/db");
    }
}
