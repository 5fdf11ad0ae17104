//! JSON Schemas for request fields, built from the limits the domain enforces, so the OpenAPI
//! document states every rule the server checks: a client (or a fuzzer) that follows it is
//! never refused, and one that breaks it always is.

use utoipa::openapi::schema::{ObjectBuilder, SchemaFormat, SchemaType, Type};
use utoipa::openapi::KnownFormat;

/// Matches a string holding at least one character that `str::trim` keeps: one that is not
/// Unicode `White_Space`. Spelled out because `\S` differs between regex dialects.
const NOT_BLANK: &str = "[^\\u0009-\\u000D\\u0020\\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]";

/// A string of at most `max_chars` characters (JSON Schema counts code points, as `chars` does).
pub fn text(max_chars: usize) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(max_chars))
}

/// A string of at most `max_chars` characters that is not blank.
pub fn not_blank(max_chars: usize) -> ObjectBuilder {
    text(max_chars).min_length(Some(1)).pattern(Some(NOT_BLANK))
}

/// An integer from `min` to `max`, both included.
pub fn integer(min: i64, max: i64) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(min))
        .maximum(Some(max))
}

/// A UUID in its hyphenated form.
pub fn uuid() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
}

/// `schema`, or `null`: what an optional field of a request accepts, `null` meaning absent.
pub fn or_null(schema: ObjectBuilder) -> ObjectBuilder {
    let mut schema = schema.build();
    schema.schema_type = match schema.schema_type {
        SchemaType::Type(kind) => SchemaType::from_iter([kind, Type::Null]),
        SchemaType::Array(mut kinds) => {
            if !kinds.contains(&Type::Null) {
                kinds.push(Type::Null);
            }
            SchemaType::Array(kinds)
        }
        SchemaType::AnyValue => SchemaType::AnyValue,
    };
    schema.into()
}
