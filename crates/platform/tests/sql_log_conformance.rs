//! The sql-log transport against the transport conformance suite.

platform::conformance_suite!(platform::conformance::SqlLogFixture::start());
