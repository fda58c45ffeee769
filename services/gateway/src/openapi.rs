//! The OpenAPI 3.1 document of the REST API, generated from the same
//! descriptors and annotations the gateway routes by, so it cannot drift. The
//! descriptions are the protos' own comments (the descriptor set keeps them).

use std::collections::BTreeMap;

use prost_reflect::{EnumDescriptor, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use fluxo_proto::export::Table;

use crate::routes::{Route, Routes};

/// The document for `routes`.
pub fn document(routes: &Routes, version: &str) -> Value {
    let mut schemas: BTreeMap<String, Value> = BTreeMap::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for route in routes.all() {
        let operation = operation(route, &mut schemas);
        paths
            .entry(route.template.as_str().to_owned())
            .or_default()
            .insert(route.method.as_str().to_lowercase(), operation);
    }
    schemas.insert("Status".into(), status_schema());
    json!({
        "openapi": "3.1.0",
        "tags": tags(routes),
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

/// The operation of one route; the schemas it refers to are added to `schemas`.
fn operation(route: &Route, schemas: &mut BTreeMap<String, Value>) -> Value {
    let input = route.rpc.input();
    let path_fields: Vec<&str> = route.template.fields().collect();
    let mut operation = Map::new();
    operation.insert(
        "operationId".into(),
        json!(format!("{}_{}", route.rpc.parent_service().name(), route.rpc.name())),
    );
    operation.insert("tags".into(), json!([route.rpc.parent_service().name()]));
    if let Some(text) = comment(&route.rpc.parent_file(), route.rpc.path()) {
        operation.insert("summary".into(), json!(summary(&text)));
        operation.insert("description".into(), json!(text));
    }
    operation.insert("parameters".into(), Value::Array(parameters(route, &path_fields, schemas)));
    if route.body == "*" {
        let body_name = format!("{}Body", input.name());
        schemas.entry(body_name.clone()).or_insert(Value::Null);
        let body = message_schema(&input, &path_fields, schemas);
        schemas.insert(body_name.clone(), body);
        operation.insert(
            "requestBody".into(),
            json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{body_name}")}}}}),
        );
    }
    let ok = match Table::of_response(route.rpc.output().full_name()) {
        Some(table) if route.rpc.is_server_streaming() => download(table),
        _ => {
            json!({"description": "OK", "content": {"application/json": {"schema": reference(&route.rpc.output(), schemas)}}})
        }
    };
    operation.insert(
        "responses".into(),
        json!({
            "200": ok,
            "default": {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}},
        }),
    );
    Value::Object(operation)
}

/// The answer of a server-streaming route: a CSV download (see `crate::download`).
fn download(table: Table) -> Value {
    let columns = table.columns().iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ");
    let rows = match table {
        Table::Entries => "one row per entry, in (booking date, id) order",
        Table::DailyBalances => "one row per day, in date order",
    };
    json!({
        "description": format!(
            "CSV (RFC 4180): a header row, then {rows}. Columns: {columns}. Money in integer minor units \
             beside its currency code; instants in RFC 3339. Streamed: an error before the first row is \
             answered as a JSON Status with its HTTP status; an error after it aborts the transfer, so a \
             body that ends without error is the whole export. See docs/export.md."
        ),
        "headers": {
            "Content-Disposition": {
                "description": "`attachment; filename=\"…csv\"`",
                "schema": {"type": "string"},
            },
        },
        "content": {"text/csv": {"schema": {"type": "string"}}},
    })
}

/// The path fields, then (for a route without a body) the scalar fields as
/// query parameters, then the `Idempotency-Key` header where it applies.
fn parameters(route: &Route, path_fields: &[&str], schemas: &mut BTreeMap<String, Value>) -> Vec<Value> {
    let input = route.rpc.input();
    let mut parameters: Vec<Value> = path_fields
        .iter()
        .map(|f| {
            let field = input.get_field_by_name(f);
            let mut parameter = json!({
                "name": f, "in": "path", "required": true,
                "schema": field.as_ref().map_or(json!({"type": "string"}), scalar_schema),
            });
            describe(&mut parameter, field.as_ref().and_then(field_comment));
            parameter
        })
        .collect();
    if route.body.is_empty() {
        for field in input.fields() {
            if path_fields.contains(&field.name()) {
                continue;
            }
            let mut parameter = match field.kind() {
                // A map is sent one entry per parameter: `metadata[order]=A-1042`.
                Kind::Message(_) if field.is_map() => json!({
                    "name": field.json_name(), "in": "query", "required": false,
                    "style": "deepObject", "explode": true,
                    "schema": field_schema(&field, schemas),
                }),
                // Timestamps and durations travel in their JSON string forms.
                Kind::Message(m) if !field.is_list() && well_known(&m).is_some() => json!({
                    "name": field.json_name(), "in": "query", "required": false,
                    "schema": well_known(&m),
                }),
                Kind::Message(_) => continue,
                _ => json!({
                    "name": field.json_name(), "in": "query", "required": false,
                    "schema": field_schema(&field, schemas),
                }),
            };
            describe(&mut parameter, field_comment(&field));
            parameters.push(parameter);
        }
    }
    if input.get_field_by_name("request_id").is_some() && !route.body.is_empty() {
        parameters.push(json!({
            "name": "Idempotency-Key", "in": "header", "required": false,
            "description": "Idempotency key; the same as `requestId` in the body.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 128},
        }));
    }
    parameters
}

/// The error body every operation may answer.
fn status_schema() -> Value {
    json!({
        "type": "object",
        "description": "An error: the gRPC code, a message, and google.rpc details.",
        "properties": {
            "code": {"type": "integer", "format": "int32"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": true}},
        },
        "required": ["code", "message", "details"],
    })
}

/// One tag per service, described by the service's comment.
fn tags(routes: &Routes) -> Vec<Value> {
    let mut tags: BTreeMap<&str, Value> = BTreeMap::new();
    for route in routes.all() {
        let service = route.rpc.parent_service();
        tags.entry(service.name()).or_insert_with(|| {
            let mut tag = json!({"name": service.name()});
            describe(&mut tag, comment(&service.parent_file(), service.path()));
            tag
        });
    }
    tags.into_values().collect()
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
        let mut schema = field_schema(&field, schemas);
        describe(&mut schema, field_comment(&field));
        properties.insert(field.json_name().to_owned(), schema);
    }
    let mut schema = json!({"type": "object", "properties": properties});
    describe(&mut schema, comment(&message.parent_file(), message.path()));
    schema
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

/// The comment written above the element at `path` of `file` (a field, a
/// message, a method...), without the comment markers; `None` when there is none.
fn comment(file: &FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let text = info.location.iter().find(|l| l.path == path)?.leading_comments.as_deref()?;
    let lines: Vec<&str> = text.lines().map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end()).collect();
    let text = lines.join("\n").trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// A field's comment; for an enum field, followed by what each value means.
fn field_comment(field: &FieldDescriptor) -> Option<String> {
    let own = comment(&field.parent_file(), field.path());
    match field.kind() {
        Kind::Enum(e) => {
            let values = enum_values(&e);
            Some(own.map_or(values.clone(), |own| format!("{own}\n\n{values}")))
        }
        _ => own,
    }
}

/// "`NAME`: comment" for each value of `e`, one per line.
fn enum_values(e: &EnumDescriptor) -> String {
    e.values()
        .map(|v| match comment(&e.parent_file(), v.path()) {
            Some(text) => format!("- `{}`: {}", v.name(), text.replace('\n', " ")),
            None => format!("- `{}`", v.name()),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first sentence of `text` (its first paragraph when that has no full stop).
fn summary(text: &str) -> String {
    let paragraph = text.split("\n\n").next().unwrap_or(text).replace('\n', " ");
    match paragraph.find(". ") {
        Some(end) => paragraph[..=end].to_owned(),
        None => paragraph,
    }
}

/// Sets `description` on a JSON object (a schema, a parameter, a tag).
fn describe(target: &mut Value, text: Option<String>) {
    if let (Some(object), Some(text)) = (target.as_object_mut(), text) {
        object.insert("description".into(), Value::String(text));
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

    #[test]
    fn operations_parameters_schemas_and_enums_carry_the_protos_comments() {
        let doc: serde_json::Value = serde_json::from_str(&crate::openapi_json().unwrap()).unwrap();
        let record = &doc["paths"]["/v1/merchants/{merchant_id}/entries"]["post"];
        assert_eq!(record["summary"], "Books a credit or debit for a merchant.");
        let description = record["description"].as_str().unwrap();
        assert!(description.contains("Idempotent on (merchant_id, request_id)"), "{description}");
        assert!(!description.contains("//"), "comment markers left in: {description}");

        let list = &doc["paths"]["/v1/merchants/{merchant_id}/entries"]["get"];
        let page_size =
            list["parameters"].as_array().unwrap().iter().find(|p| p["name"] == "pageSize").unwrap();
        assert!(page_size["description"].as_str().unwrap().starts_with("Maximum number of entries"));
        let merchant = list["parameters"].as_array().unwrap().iter().find(|p| p["in"] == "path").unwrap();
        assert_eq!(merchant["description"], "The merchant whose entries are listed.");

        let money = &doc["components"]["schemas"]["Money"];
        assert!(money["description"].as_str().unwrap().contains("Never a floating-point number"));
        let minor = money["properties"]["minorUnits"]["description"].as_str().unwrap();
        assert!(minor.contains("Serialised as a string in JSON"), "{minor}");
        // An enum field lists what each value means.
        let kind =
            doc["components"]["schemas"]["Entry"]["properties"]["type"]["description"].as_str().unwrap();
        assert!(kind.contains("- `DEBIT`: Money out: decreases the balance."), "{kind}");
        // The exports answer CSV.
        let export = &doc["paths"]["/v1/merchants/{merchant_id}/entries:export"]["get"];
        let ok = &export["responses"]["200"];
        assert_eq!(ok["content"]["text/csv"]["schema"]["type"], "string");
        assert!(ok["description"].as_str().unwrap().contains("`amount_minor`"), "{ok}");
        assert!(export["parameters"].as_array().unwrap().iter().any(|p| p["name"] == "createdAfter"));
        // Each service is a tag with its own comment.
        let tags = doc["tags"].as_array().unwrap();
        let ledger = tags.iter().find(|t| t["name"] == "LedgerService").unwrap();
        assert_eq!(ledger["description"], "Records and reads ledger entries.");
    }
}
