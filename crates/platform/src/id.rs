//! Identifier newtypes for domain modules.

/// Declares `$name`, a UUIDv7 identifier: `new()` mints one, `parse()` accepts only a UUID,
/// and it displays as the UUID's hyphenated form.
#[macro_export]
macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name($crate::uuid::Uuid);

        impl $name {
            pub fn new() -> Self {
                $name($crate::uuid::Uuid::now_v7())
            }

            /// None for anything but a UUID.
            pub fn parse(text: &str) -> Option<Self> {
                $crate::uuid::Uuid::parse_str(text).ok().map($name)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
