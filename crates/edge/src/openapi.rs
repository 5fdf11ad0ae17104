//! What the edge adds to the services' OpenAPI document. Every error leaves the edge as a
//! `Problem` in `application/problem+json`, and any operation may fail with a 500 (a database
//! error, a panic), so the document says both, whatever the services' annotations spell.

use crate::problem::{Problem, CONTENT_TYPE};
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::Response;
use utoipa::openapi::{Content, OpenApi, Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

/// Documents error responses as problems, and adds the 500 every operation may answer.
pub(crate) fn document_problems(openapi: &mut OpenApi) {
    for item in openapi.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            document_operation(operation);
        }
    }
    let components = openapi.components.get_or_insert_with(Default::default);
    let mut schemas = vec![(Problem::name().into_owned(), Problem::schema())];
    Problem::schemas(&mut schemas);
    components.schemas.extend(schemas);
}

fn document_operation(operation: &mut Operation) {
    let responses = &mut operation.responses.responses;
    responses.entry("500".to_owned()).or_insert_with(|| {
        RefOr::T(Response::new(
            "The server failed; the cause is logged, never sent.",
        ))
    });
    for (status, response) in responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        if status.starts_with('4') || status.starts_with('5') {
            response.content.clear();
            response.content.insert(
                CONTENT_TYPE.to_owned(),
                Content::new(Some(Ref::from_schema_name(Problem::name()))),
            );
        }
    }
}
