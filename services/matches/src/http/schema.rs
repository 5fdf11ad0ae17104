//! The request bodies' JSON Schemas, written from the rules `into_command` checks rather
//! than derived from the DTOs (whose fields are all optional, so that a missing one is named
//! in the 400): a client or fuzzer that follows the document is never refused, and one that
//! breaks it always is.

use super::{CreateRequest, MoveRequest, MAX_COORDINATE};
use crate::app::MAX_NAME_CHARS;
use crate::domain::SIZES;
use edge::schema::{integer, not_blank, or_null};
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type,
};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

fn player(color: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .property(
            "color",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([color])),
        )
        .property("name", not_blank(MAX_NAME_CHARS))
        .required("color")
        .required("name")
}

/// One black and one white player, in either order.
fn players() -> OneOfBuilder {
    let pair = |first: &str, second: &str| {
        ArrayBuilder::new()
            .prefix_items([player(first), player(second)])
            .min_items(Some(2))
            .max_items(Some(2))
    };
    OneOfBuilder::new()
        .item(pair("black", "white"))
        .item(pair("white", "black"))
}

impl PartialSchema for CreateRequest {
    fn schema() -> RefOr<Schema> {
        let gridsize = || {
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .enum_values(Some(SIZES))
        };
        let name = || not_blank(MAX_NAME_CHARS);
        // With `players`, the original's keys are ignored (any text or null will do).
        let original_ignored = || or_null(ObjectBuilder::new().schema_type(Type::String));
        let new_form = ObjectBuilder::new()
            .property("gridsize", gridsize())
            .property("players", players())
            .property("playerWhite", original_ignored())
            .property("playerBlack", original_ignored())
            .required("gridsize")
            .required("players");
        let original_form = ObjectBuilder::new()
            .property("gridsize", gridsize())
            .property("players", ObjectBuilder::new().schema_type(Type::Null))
            .property("playerWhite", name())
            .property("playerBlack", name())
            .required("gridsize")
            .required("playerWhite")
            .required("playerBlack");
        AnyOfBuilder::new()
            .description(Some(
                "A match to start: `players` holds one black and one white player; the \
                 original's `playerWhite` and `playerBlack` are accepted instead. Keys match \
                 whatever their case.",
            ))
            .item(new_form)
            .item(original_form)
            .into()
    }
}

impl ToSchema for CreateRequest {}

impl PartialSchema for MoveRequest {
    fn schema() -> RefOr<Schema> {
        let coordinate = || integer(0, i64::from(MAX_COORDINATE));
        let position = || {
            ObjectBuilder::new()
                .description(Some(
                    "`x` is the column, `y` the row, from 0; off this match's board is a 400.",
                ))
                .property("x", coordinate())
                .property("y", coordinate())
                .required("x")
                .required("y")
        };
        let flag = || or_null(ObjectBuilder::new().schema_type(Type::Boolean));
        let only = |property: &str, schema: ObjectBuilder| {
            ObjectBuilder::new()
                .property(property, schema)
                .required(property)
        };
        let chosen = || {
            ObjectBuilder::new()
                .schema_type(Type::Boolean)
                .enum_values(Some([true]))
        };
        let fields = ObjectBuilder::new()
            .property(
                "player",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["black", "white"])),
            )
            .property("position", or_null(position()))
            .property("pass", flag())
            .property("resign", flag())
            .required("player");
        AllOfBuilder::new()
            .description(Some(
                "A move: a `position` to place a stone on, `\"pass\": true` or \
                 `\"resign\": true`, exactly one of them.",
            ))
            .item(fields)
            .item(
                OneOfBuilder::new()
                    .item(only("position", position()))
                    .item(only("pass", chosen()))
                    .item(only("resign", chosen())),
            )
            .into()
    }
}

impl ToSchema for MoveRequest {}
