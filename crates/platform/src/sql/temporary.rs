//! A database created on a server for one run (a test's, a benchmark's) and dropped after it.

use super::{Backend, Error, ServerUrl};

pub struct TemporaryDatabase {
    admin: ServerUrl,
    name: String,
    url: String,
}

impl TemporaryDatabase {
    /// Creates a database named `prefix` plus a unique suffix on the server `admin_url`
    /// reaches (as a user that may create databases). Blocks: call it off the runtime.
    pub fn create(admin_url: &str, prefix: &str) -> Result<TemporaryDatabase, Error> {
        let admin = ServerUrl::parse(admin_url).ok_or_else(|| Error::url(admin_url))?;
        let name = format!("{prefix}{}", uuid::Uuid::now_v7().simple());
        let create = match admin.backend() {
            Backend::Postgres => format!("CREATE DATABASE {name}"),
            _ => format!("CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"),
        };
        admin.connect()?.execute_batch(&create)?;
        Ok(TemporaryDatabase {
            url: with_database(admin_url, &name),
            admin,
            name,
        })
    }

    /// The new database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TemporaryDatabase {
    fn drop(&mut self) {
        let drop = match self.admin.backend() {
            Backend::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            _ => format!("DROP DATABASE IF EXISTS {}", self.name),
        };
        let admin = self.admin.clone();
        // The synchronous PostgreSQL client must not run on a runtime's thread.
        let dropped = std::thread::spawn(move || {
            admin
                .connect()
                .and_then(|conn| conn.execute_batch(&drop))
                .map_err(|error| error.to_string())
        })
        .join();
        if let Ok(Err(error)) = dropped {
            tracing::warn!(database = %self.name, %error, "cannot drop a temporary database");
        }
    }
}

/// `url` naming database `name` instead of its own.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let authority = base.find("://").map_or(0, |at| at + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |at| authority + at);
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{}/{name}{query}", &base[..path])
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_of_a_url_is_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "t"),
            "postgres://u@h:5432/t"
        );
        assert_eq!(
            with_database("mysql://root@h:3306", "t"),
            "mysql://root@h:3306/t"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "t"),
            "postgres://u@h/t?sslmode=disable"
        );
    }
}
