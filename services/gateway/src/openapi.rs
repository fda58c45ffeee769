//! The OpenAPI 3.1 document of the REST API, generated from the same
//! descriptors and annotations the gateway routes by, so it cannot drift.

use std::collections::BTreeMap;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use crate::routes::Routes;

/// The document for `routes`.
pub fn document(routes: &Routes, version: &str) -> Value {
    let mut schemas: BTreeMap<String, Value> = BTreeMap::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for route in routes.all() {
        let input = route.rpc.input();
        let path_fields: Vec<&str> = route.template.fields().collect();
        let mut parameters: Vec<Value> = path_fields
            .iter()
            .map(|f| {
                let field = input.get_field_by_name(f);
                json!({
                    "name": f, "in": "path", "required": true,
                    "schema": field.as_ref().map_or(json!({"type": "string"}), scalar_schema),
                })
            })
            .collect();
        if route.body.is_empty() {
            for field in input.fields() {
                if path_fields.contains(&field.name()) || matches!(field.kind(), Kind::Message(_)) {
                    continue;
                }
                parameters.push(json!({
                    "name": field.json_name(), "in": "query", "required": false,
                    "schema": field_schema(&field, &mut schemas),
                }));
            }
        }
        if input.get_field_by_name("request_id").is_some() && !route.body.is_empty() {
            parameters.push(json!({
                "name": "Idempotency-Key", "in": "header", "required": false,
                "description": "Idempotency key; the same as `requestId` in the body.",
                "schema": {"type": "string", "minLength": 1, "maxLength": 128},
            }));
        }
        let mut operation = Map::new();
        operation.insert(
            "operationId".into(),
            json!(format!("{}_{}", route.rpc.parent_service().name(), route.rpc.name())),
        );
        operation.insert("tags".into(), json!([route.rpc.parent_service().name()]));
        operation.insert("parameters".into(), Value::Array(parameters));
        if route.body == "*" {
            let body_name = format!("{}Body", input.name());
            schemas.entry(body_name.clone()).or_insert(Value::Null);
            let body = message_schema(&input, &path_fields, &mut schemas);
            schemas.insert(body_name.clone(), body);
            operation.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{body_name}")}}}}),
            );
        }
        let output = reference(&route.rpc.output(), &mut schemas);
        operation.insert(
            "responses".into(),
            json!({
                "200": {"description": "OK", "content": {"application/json": {"schema": output}}},
                "default": {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}},
            }),
        );
        paths
            .entry(route.template.as_str().to_owned())
            .or_default()
            .insert(route.method.as_str().to_lowercase(), Value::Object(operation));
    }
    schemas.insert(
        "Status".into(),
        json!({
            "type": "object",
            "description": "An error: the gRPC code, a message, and google.rpc details.",
            "properties": {
                "code": {"type": "integer", "format": "int32"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": true}},
            },
            "required": ["code", "message", "details"],
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "fluxo",
            "version": version,
            "description": "Merchant cash-flow ledger and daily consolidated balances. Generated from the protos' google.api.http annotations.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{"bearer": []}],
    })
}

fn reference(message: &MessageDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    if let Some(special) = well_known(message) {
        return special;
    }
    let name = message.name().to_owned();
    if !schemas.contains_key(&name) {
        schemas.insert(name.clone(), Value::Null); // breaks recursion
        let schema = message_schema(message, &[], schemas);
        schemas.insert(name.clone(), schema);
    }
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn well_known(message: &MessageDescriptor) -> Option<Value> {
    match message.full_name() {
        "google.protobuf.Timestamp" => Some(json!({"type": "string", "format": "date-time"})),
        "google.protobuf.Duration" => Some(json!({"type": "string"})),
        _ => None,
    }
}

fn message_schema(
    message: &MessageDescriptor,
    skip: &[&str],
    schemas: &mut BTreeMap<String, Value>,
) -> Value {
    let mut properties = Map::new();
    for field in message.fields() {
        if skip.contains(&field.name()) {
            continue;
        }
        properties.insert(field.json_name().to_owned(), field_schema(&field, schemas));
    }
    json!({"type": "object", "properties": properties})
}

fn field_schema(field: &FieldDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    let single = match field.kind() {
        // An unset message field is rendered as null.
        Kind::Message(m) if !field.is_list() && !field.is_map() => {
            json!({"anyOf": [reference(&m, schemas), {"type": "null"}]})
        }
        Kind::Message(m) => reference(&m, schemas),
        _ => scalar_schema(field),
    };
    if field.is_map() {
        let value = match field.kind() {
            Kind::Message(entry) => entry.map_entry_value_field(),
            _ => return json!({"type": "object"}),
        };
        json!({"type": "object", "additionalProperties": field_schema(&value, schemas)})
    } else if field.is_list() {
        json!({"type": "array", "items": single})
    } else {
        single
    }
}

fn scalar_schema(field: &FieldDescriptor) -> Value {
    match field.kind() {
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({"type": "integer", "format": "int32"}),
        Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "format": "int64", "minimum": 0}),
        // proto3 JSON writes 64-bit integers as decimal strings.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"})
        }
        Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}),
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Enum(e) => {
            json!({"type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>()})
        }
        Kind::Message(_) => json!({"type": "object"}),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_document_is_the_generated_one() {
        let committed = include_str!("../../../docs/openapi.json");
        let generated = crate::openapi_json().unwrap();
        assert!(
            committed == generated,
            "docs/openapi.json is out of date: regenerate it with `cargo run -- openapi > docs/openapi.json`"
        );
    }
}
