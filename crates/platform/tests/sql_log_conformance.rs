//! The sql-log transport against the transport conformance suite, unchanged, on every
//! database it runs on.

mod sqlite {
    platform::conformance_suite!(platform::conformance::SqlLogFixture::start());
}

mod postgres {
    platform::conformance_suite!(platform::conformance::SqlLogFixture::on(
        platform::Backend::Postgres
    ));
}

mod mariadb {
    platform::conformance_suite!(platform::conformance::SqlLogFixture::on(
        platform::Backend::Mysql
    ));
}
