//! Rows a server's writer holds back so that the units of one batch insert theirs together.
//!
//! A unit of work that inserts a row and never looks at the answer (`UnitOfWork::insert`)
//! costs a server a statement, and a round trip, per row; units batched into one
//! transaction can share one multi-row `INSERT` per statement instead. The writer holds such
//! rows until the transaction runs its next statement of any other kind, or commits: a read
//! that follows, in the unit or a later one, sees them, and their foreign keys find the rows
//! of earlier statements, since each statement's rows go in the order the statements were
//! first used. What holding costs is the error: a multi-row insert that fails does not say
//! whose row failed, so the batch rolls back and its units run again one at a time
//! (`StoreError::Unmerged`), where each row is inserted at once and its error reaches its unit.

use super::Value;

/// Rows one statement writes at most: far below every server's limit of placeholders
/// (65 535), with the widest rows the services insert.
const MAX_ROWS: usize = 500;
/// Rows held before they are written whatever comes next: a unit inserting many rows keeps
/// a bounded amount of them in memory.
const MAX_HELD: usize = 4 * MAX_ROWS;

/// A bound value the writer owns until the row is written.
#[derive(Debug, Clone)]
enum Held {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Held {
    fn of(value: &Value<'_>) -> Held {
        match *value {
            Value::Null => Held::Null,
            Value::Int(value) => Held::Int(value),
            Value::Real(value) => Held::Real(value),
            Value::Text(value) => Held::Text(value.to_owned()),
            Value::Blob(value) => Held::Blob(value.to_owned()),
        }
    }

    fn value(&self) -> Value<'_> {
        match self {
            Held::Null => Value::Null,
            Held::Int(value) => Value::Int(*value),
            Held::Real(value) => Value::Real(*value),
            Held::Text(value) => Value::Text(value),
            Held::Blob(value) => Value::Blob(value),
        }
    }
}

struct HeldRow {
    statement: &'static str,
    values: Vec<Held>,
}

/// Where a unit started: what to go back to when it rolls back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark {
    rows: usize,
    written: usize,
}

/// One multi-row statement to run: its SQL and its values, in order.
pub(super) struct Merged<'a> {
    pub sql: String,
    pub values: Vec<Value<'a>>,
}

/// The rows a writer's connection holds, and whether it holds any more.
#[derive(Default)]
pub(super) struct HeldRows {
    /// Does `hold` take rows (a server writer running a unit that is not running alone)?
    pub holding: bool,
    rows: Vec<HeldRow>,
    /// How many of `rows`, from the first, are in the transaction.
    written: usize,
    /// How writing held rows failed, if it did: which units' rows failed is not known.
    pub failed: Option<String>,
}

impl HeldRows {
    /// Holds the row `statement` inserts with `values`, if `statement` is a single-row
    /// `INSERT … VALUES (?, …)`, maybe `ON CONFLICT (…) DO NOTHING`, and rows are being
    /// held; gives the values back otherwise.
    pub fn hold<'v>(
        &mut self,
        statement: &'static str,
        values: Vec<Value<'v>>,
    ) -> Option<Vec<Value<'v>>> {
        if !self.holding || split(statement).is_none() {
            return Some(values);
        }
        self.rows.push(HeldRow {
            statement,
            values: values.iter().map(Held::of).collect(),
        });
        None
    }

    pub fn is_pending(&self) -> bool {
        self.written < self.rows.len()
    }

    /// Are enough rows pending to write them now?
    pub fn is_full(&self) -> bool {
        self.rows.len() - self.written >= MAX_HELD
    }

    /// The statements that write the rows not yet written: for each statement, in the
    /// order of first use, its rows in the order they were held.
    pub fn pending(&self) -> Vec<Merged<'_>> {
        let pending = &self.rows[self.written..];
        let mut statements: Vec<&'static str> = Vec::new();
        for row in pending {
            if !statements.contains(&row.statement) {
                statements.push(row.statement);
            }
        }
        let mut merged = Vec::new();
        for statement in statements {
            let rows: Vec<&HeldRow> = pending
                .iter()
                .filter(|row| row.statement == statement)
                .collect();
            for chunk in rows.chunks(MAX_ROWS) {
                merged.push(Merged {
                    sql: merged_sql(statement, chunk.len()),
                    values: chunk
                        .iter()
                        .flat_map(|row| row.values.iter().map(Held::value))
                        .collect(),
                });
            }
        }
        merged
    }

    /// Every held row is in the transaction now.
    pub fn written(&mut self) {
        self.written = self.rows.len();
    }

    pub fn mark(&self) -> Mark {
        Mark {
            rows: self.rows.len(),
            written: self.written,
        }
    }

    /// A unit that started at `mark` rolled back to its savepoint: its own rows go, and the
    /// rows of earlier units written since it started (inside its savepoint) are pending
    /// again.
    pub fn roll_back_to(&mut self, mark: Mark) {
        self.rows.truncate(mark.rows);
        self.written = self.written.min(mark.written);
    }

    /// The transaction ended, either way.
    pub fn clear(&mut self) {
        self.rows.clear();
        self.written = 0;
        self.failed = None;
    }
}

/// `INSERT … VALUES (?, …)`, maybe followed by `ON CONFLICT (…) DO NOTHING`, as what comes
/// before its row, the row's placeholders, and the conflict clause (or nothing); None for
/// any other statement (another clause after the row, more than one row). Rows merged
/// under `DO NOTHING` each do what they would alone: a duplicate is skipped, even one of
/// another row in the same statement (`DO UPDATE` would fail on that, so it is not held).
fn split(statement: &str) -> Option<(&str, &str, &str)> {
    let (statement, conflict) = match statement.find(" ON CONFLICT ") {
        Some(at) => {
            let (statement, conflict) = statement.split_at(at);
            let target = conflict.trim().strip_prefix("ON CONFLICT (")?;
            let (columns, action) = target.split_once(')')?;
            if columns.contains('(') || action.trim() != "DO NOTHING" {
                return None;
            }
            (statement, conflict)
        }
        None => (statement, ""),
    };
    let at = statement.rfind("VALUES")? + "VALUES".len();
    let (head, row) = statement.split_at(at);
    let row = row.trim();
    let placeholders = row.strip_prefix('(')?.strip_suffix(')')?;
    let only_placeholders = placeholders
        .split(',')
        .all(|placeholder| placeholder.trim() == "?");
    (head.trim_start().starts_with("INSERT") && only_placeholders).then_some((head, row, conflict))
}

/// `statement`, a single-row insert, as one that inserts `rows` rows.
fn merged_sql(statement: &str, rows: usize) -> String {
    let Some((head, row, conflict)) = split(statement) else {
        return statement.to_owned();
    };
    let mut sql = String::with_capacity(head.len() + rows * (row.len() + 2) + conflict.len());
    sql.push_str(head);
    sql.push(' ');
    for index in 0..rows {
        if index > 0 {
            sql.push_str(", ");
        }
        sql.push_str(row);
    }
    sql.push_str(conflict);
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSERT: &str = "INSERT INTO t (a, b) VALUES (?, ?)";

    fn held(rows: &HeldRows) -> Vec<(String, Vec<i64>)> {
        rows.pending()
            .into_iter()
            .map(|merged| {
                let values = merged
                    .values
                    .iter()
                    .map(|value| match value {
                        Value::Int(value) => *value,
                        other => panic!("{other:?}"),
                    })
                    .collect();
                (merged.sql, values)
            })
            .collect()
    }

    fn holding() -> HeldRows {
        HeldRows {
            holding: true,
            ..HeldRows::default()
        }
    }

    #[test]
    fn only_single_row_inserts_of_placeholders_are_held() {
        assert!(split(INSERT).is_some());
        assert!(split("INSERT INTO t (a) VALUES (?) ON CONFLICT (a) DO NOTHING").is_some());
        assert!(
            split("INSERT INTO t (a) VALUES (?) ON CONFLICT (a) DO NOTHING RETURNING a").is_none()
        );
        assert!(
            split("INSERT INTO t (a) VALUES (?) ON CONFLICT (a) DO UPDATE SET a = excluded.a")
                .is_none()
        );
        assert!(split("INSERT INTO t (a) VALUES (?) RETURNING a").is_none());
        assert!(split("INSERT INTO t (a) VALUES (?), (?)").is_none());
        assert!(split("INSERT INTO t (a) VALUES (1)").is_none());
        assert!(split("UPDATE t SET a = ? WHERE b IN (SELECT VALUES (?))").is_none());
        assert!(holding()
            .hold("INSERT INTO t (a) SELECT ?", vec![Value::Int(1)])
            .is_some());
    }

    #[test]
    fn rows_are_written_a_statement_at_a_time_in_the_order_of_first_use() {
        let mut rows = holding();
        let other = "INSERT INTO u (c) VALUES (?)";
        assert!(rows
            .hold(INSERT, vec![Value::Int(1), Value::Int(2)])
            .is_none());
        assert!(rows.hold(other, vec![Value::Int(3)]).is_none());
        assert!(rows
            .hold(INSERT, vec![Value::Int(4), Value::Int(5)])
            .is_none());
        assert_eq!(
            held(&rows),
            [
                (
                    "INSERT INTO t (a, b) VALUES (?, ?), (?, ?)".to_owned(),
                    vec![1, 2, 4, 5]
                ),
                ("INSERT INTO u (c) VALUES (?)".to_owned(), vec![3]),
            ]
        );
        rows.written();
        assert!(!rows.is_pending());
        assert!(held(&rows).is_empty());
    }

    #[test]
    fn rows_merged_under_do_nothing_keep_the_clause_after_them() {
        let mut rows = holding();
        let skipping = "INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT (a) DO NOTHING";
        rows.hold(skipping, vec![Value::Int(1), Value::Int(2)]);
        rows.hold(skipping, vec![Value::Int(3), Value::Int(4)]);
        assert_eq!(
            held(&rows),
            [(
                "INSERT INTO t (a, b) VALUES (?, ?), (?, ?) ON CONFLICT (a) DO NOTHING".to_owned(),
                vec![1, 2, 3, 4]
            )]
        );
    }

    #[test]
    fn a_unit_that_rolls_back_drops_its_rows_and_rewrites_the_earlier_rows_it_carried() {
        let mut rows = holding();
        rows.hold(INSERT, vec![Value::Int(1), Value::Int(1)]);
        let mark = rows.mark();
        rows.hold(INSERT, vec![Value::Int(2), Value::Int(2)]);
        // The unit ran a statement: both rows went in, inside its savepoint.
        rows.written();
        rows.roll_back_to(mark);
        assert_eq!(
            held(&rows),
            [("INSERT INTO t (a, b) VALUES (?, ?)".to_owned(), vec![1, 1])]
        );
    }

    #[test]
    fn a_writer_that_is_not_holding_gives_the_row_back() {
        let mut rows = HeldRows::default();
        assert!(rows
            .hold(INSERT, vec![Value::Int(1), Value::Int(2)])
            .is_some());
        assert!(!rows.is_pending());
    }

    #[test]
    fn a_holder_is_full_at_its_bound_and_empty_once_written() {
        let mut rows = holding();
        for value in 0..MAX_HELD as i64 {
            assert!(!rows.is_full());
            rows.hold("INSERT INTO u (c) VALUES (?)", vec![Value::Int(value)]);
        }
        assert!(rows.is_full());
        rows.written();
        assert!(!rows.is_full());
    }

    #[test]
    fn many_rows_take_several_statements() {
        let mut rows = holding();
        for value in 0..(MAX_ROWS as i64 + 1) {
            rows.hold("INSERT INTO u (c) VALUES (?)", vec![Value::Int(value)]);
        }
        let merged = rows.pending();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].values.len(), MAX_ROWS);
        assert_eq!(merged[1].sql, "INSERT INTO u (c) VALUES (?)");
    }
}
