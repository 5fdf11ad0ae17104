//! The request bodies' JSON Schemas, written from the domain's limits rather than derived from
//! the DTOs (whose fields are all optional, so that a missing one is named by the domain's
//! rules): what `EventDraft::validate` and `LocationDraft::validate` accept. Keys are
//! documented in lower case; the server matches them whatever their case.

use super::{EventRequest, LocationRequest};
use crate::domain::{HALL_CAPACITY, HOURS, MAX_HALLS, MAX_NAME_CHARS, MAX_TEXT_CHARS};
use edge::schema::{integer, not_blank, or_null, text, uuid};
use utoipa::openapi::schema::{
    AnyOfBuilder, ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

impl PartialSchema for EventRequest {
    fn schema() -> RefOr<Schema> {
        let date = || integer(i64::MIN, i64::MAX);
        ObjectBuilder::new()
            .description(Some(
                "An event to create. Keys match whatever their case (`startdate`, `StartDate`, ...).",
            ))
            .property("name", not_blank(MAX_NAME_CHARS))
            .property(
                "startdate",
                date().description(Some("Opaque: stored and echoed as given.")),
            )
            .property(
                "enddate",
                date().description(Some(
                    "Not before `startdate` (400 otherwise; JSON Schema cannot compare fields).",
                )),
            )
            .property("duration", integer(1, i64::MAX))
            .property(
                "location",
                AnyOfBuilder::new()
                    .item(known_location())
                    .item(new_location(ObjectBuilder::new().schema_type(Type::Null))),
            )
            .required("name")
            .required("startdate")
            .required("enddate")
            .required("duration")
            .required("location")
            .into()
    }
}

impl ToSchema for EventRequest {}

impl PartialSchema for LocationRequest {
    fn schema() -> RefOr<Schema> {
        let ignored = or_null(ObjectBuilder::new().schema_type(Type::String)).description(Some(
            "Ignored here; an event's `location.id` names a known location.",
        ));
        new_location(ignored)
            .description(Some(
                "A location to create. Keys match whatever their case.",
            ))
            .into()
    }
}

impl ToSchema for LocationRequest {}

/// A location to create, with `id` as the context allows it.
fn new_location(id: ObjectBuilder) -> ObjectBuilder {
    let hours = || or_null(integer(*HOURS.start(), *HOURS.end())).description(Some("0 if absent."));
    let hall = ObjectBuilder::new()
        .property("name", or_null(text(MAX_NAME_CHARS)))
        .property("location", or_null(text(MAX_TEXT_CHARS)))
        .property(
            "capacity",
            integer(*HALL_CAPACITY.start(), *HALL_CAPACITY.end()),
        )
        .required("capacity");
    ObjectBuilder::new()
        .property("id", id)
        .property("name", not_blank(MAX_NAME_CHARS))
        .property("address", or_null(text(MAX_TEXT_CHARS)))
        .property("country", or_null(text(MAX_NAME_CHARS)))
        .property("opentime", hours())
        .property("closetime", hours())
        .property(
            "halls",
            ArrayBuilder::new()
                .items(hall)
                .min_items(Some(1))
                .max_items(Some(MAX_HALLS)),
        )
        .required("name")
        .required("halls")
}

/// A known location, by id. Its other fields are ignored but still read, so each must have
/// its type; an id that names no location is a 400.
fn known_location() -> ObjectBuilder {
    let string = || or_null(ObjectBuilder::new().schema_type(Type::String));
    let number = || or_null(integer(i64::MIN, i64::MAX));
    let hall = ObjectBuilder::new()
        .property("name", string())
        .property("location", string())
        .property("capacity", number());
    let halls = ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .items(hall);
    ObjectBuilder::new()
        .property(
            "id",
            uuid().description(Some(
                "A known location's id; the rest of `location` is ignored.",
            )),
        )
        .property("name", string())
        .property("address", string())
        .property("country", string())
        .property("opentime", number())
        .property("closetime", number())
        .property("halls", halls)
        .required("id")
}
