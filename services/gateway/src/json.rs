//! Request JSON read as strictly as protojson reads it, with every error
//! naming the field at fault (`amount.minor_units`, not "line 1 column 88").
//!
//! Written here rather than left to prost-reflect's serde support because a
//! money API must not read one request two ways: serde maps keep the last of
//! two equal keys, where other parsers on the path (a WAF, an audit log,
//! grpc-gateway itself) keep the first; both names of one field
//! (`minor_units` and `minorUnits`) would be merged; an enum name nobody
//! defined would silently become the default; and errors carry positions, not
//! fields. The JSON is first read into a tree that keeps every key in order
//! ([`Json`]), then walked with the message descriptor.

use std::collections::HashSet;

use base64::Engine;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value};
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};

use crate::transcode::BindError;

/// A JSON document with every object key kept, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> serde::Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Unsigned(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Signed(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries: Vec<(String, Json)> = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, Json>()? {
            entries.push((key, value));
        }
        Ok(Json::Object(entries))
    }
}

/// Parses `body` (one JSON object, nothing after it) as `descriptor`;
/// `prefix` names where the body goes in the request (empty: the whole message).
pub(crate) fn parse(
    descriptor: &MessageDescriptor,
    body: &[u8],
    prefix: &str,
) -> Result<DynamicMessage, BindError> {
    let syntax = |e: serde_json::Error| BindError {
        field: if prefix.is_empty() { "body".to_owned() } else { prefix.to_owned() },
        reason: format!("invalid JSON: {e}"),
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let tree = <Json as serde::Deserialize>::deserialize(&mut deserializer).map_err(syntax)?;
    deserializer.end().map_err(syntax)?;
    message(descriptor, &tree, prefix)
}

fn err(path: &str, reason: impl Into<String>) -> BindError {
    BindError {
        field: if path.is_empty() { "body".to_owned() } else { path.to_owned() },
        reason: reason.into(),
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") }
}

fn message(descriptor: &MessageDescriptor, json: &Json, path: &str) -> Result<DynamicMessage, BindError> {
    if descriptor.full_name().starts_with("google.protobuf.") {
        return well_known(descriptor, json, path);
    }
    let entries = match json {
        Json::Object(entries) => entries,
        Json::Null => return Ok(DynamicMessage::new(descriptor.clone())),
        _ => return Err(err(path, "must be a JSON object")),
    };
    let mut message = DynamicMessage::new(descriptor.clone());
    let mut keys = HashSet::new();
    let mut fields = HashSet::new();
    for (key, value) in entries {
        if !keys.insert(key.as_str()) {
            return Err(err(&join(path, key), "given more than once"));
        }
        // Unknown fields are ignored, as grpc-gateway does.
        let Some(field) =
            descriptor.get_field_by_json_name(key).or_else(|| descriptor.get_field_by_name(key))
        else {
            continue;
        };
        let at = join(path, field.name());
        if !fields.insert(field.number()) {
            return Err(err(
                &at,
                format!("given more than once (as \"{}\" and \"{}\")", field.name(), field.json_name()),
            ));
        }
        if let Some(oneof) = field.containing_oneof()
            && !oneof.is_synthetic()
            && oneof
                .fields()
                .any(|other| other.number() != field.number() && fields.contains(&other.number()))
        {
            return Err(err(&at, format!("only one field of {} may be given", oneof.name())));
        }
        if *value == Json::Null && !is_json_value(&field) {
            continue;
        }
        let value = field_value(&field, value, &at)?;
        message.set_field(&field, value);
    }
    Ok(message)
}

fn is_json_value(field: &FieldDescriptor) -> bool {
    matches!(field.kind(), Kind::Message(m) if m.full_name() == "google.protobuf.Value")
}

fn field_value(field: &FieldDescriptor, json: &Json, path: &str) -> Result<Value, BindError> {
    if field.is_map() {
        let Json::Object(entries) = json else { return Err(err(path, "must be a JSON object")) };
        let Kind::Message(entry) = field.kind() else { return Err(err(path, "is not a map")) };
        let key_field = entry.map_entry_key_field();
        let value_field = entry.map_entry_value_field();
        let mut map = std::collections::HashMap::new();
        for (key, value) in entries {
            let at = format!("{path}[{key}]");
            let key = map_key(&key_field.kind(), key, &at)?;
            if map.insert(key, single(&value_field.kind(), value, &at)?).is_some() {
                return Err(err(&at, "given more than once"));
            }
        }
        return Ok(Value::Map(map));
    }
    if field.is_list() {
        let Json::Array(items) = json else { return Err(err(path, "must be a JSON array")) };
        let kind = field.kind();
        return items
            .iter()
            .enumerate()
            .map(|(i, item)| single(&kind, item, &format!("{path}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::List);
    }
    single(&field.kind(), json, path)
}

fn single(kind: &Kind, json: &Json, path: &str) -> Result<Value, BindError> {
    match (kind, json) {
        (Kind::Message(m), _) => Ok(Value::Message(message(m, json, path)?)),
        (Kind::Enum(e), Json::String(name)) => e
            .get_value_by_name(name)
            .map(|v| Value::EnumNumber(v.number()))
            .ok_or_else(|| err(path, format!("\"{name}\" is not one of {}", known_values(e)))),
        (Kind::Enum(e), Json::Unsigned(_) | Json::Signed(_)) => {
            let n = integer(json, path, i64::from(i32::MIN), i64::from(i32::MAX))?;
            let n = i32::try_from(n).map_err(|_| err(path, "is out of range"))?;
            e.get_value(n)
                .map(|v| Value::EnumNumber(v.number()))
                .ok_or_else(|| err(path, format!("{n} is not a defined value")))
        }
        (Kind::Enum(_), _) => Err(err(path, "must be the name of a value (a string)")),
        (Kind::String, Json::String(s)) => Ok(Value::String(s.clone())),
        (Kind::String, _) => Err(err(path, "must be a string")),
        (Kind::Bool, Json::Bool(b)) => Ok(Value::Bool(*b)),
        (Kind::Bool, _) => Err(err(path, "must be true or false")),
        (Kind::Bytes, Json::String(s)) => {
            base64_bytes(s).map(|b| Value::Bytes(b.into())).ok_or_else(|| err(path, "must be base64"))
        }
        (Kind::Bytes, _) => Err(err(path, "must be a base64 string")),
        (_, Json::String(s)) => scalar_from_str(kind, s, path),
        (Kind::Double | Kind::Float, Json::Float(_) | Json::Signed(_) | Json::Unsigned(_)) => {
            float(kind, json, path)
        }
        (_, Json::Unsigned(_) | Json::Signed(_) | Json::Float(_)) => number(kind, json, path),
        _ => Err(err(path, format!("must be {}", describe(kind)))),
    }
}

/// The names of an enum's values but the unspecified one, for an error.
fn known_values(e: &prost_reflect::EnumDescriptor) -> String {
    e.values().filter(|v| v.number() != 0).map(|v| v.name().to_owned()).collect::<Vec<_>>().join(", ")
}

fn describe(kind: &Kind) -> &'static str {
    match kind {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => "a 32-bit integer",
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => "a 64-bit integer (a JSON number or a decimal string)",
        Kind::Uint32 | Kind::Fixed32 => "an unsigned 32-bit integer",
        Kind::Uint64 | Kind::Fixed64 => "an unsigned 64-bit integer",
        Kind::Float | Kind::Double => "a number",
        _ => "a valid value",
    }
}

/// A JSON number as an integer in `min..=max`; never rounded.
fn integer(json: &Json, path: &str, min: i64, max: i64) -> Result<i64, BindError> {
    let n = match json {
        Json::Signed(v) => Some(*v),
        Json::Unsigned(v) => i64::try_from(*v).ok(),
        _ => None,
    };
    n.filter(|n| (min..=max).contains(n))
        .ok_or_else(|| err(path, format!("is out of range ({min} to {max})")))
}

fn number(kind: &Kind, json: &Json, path: &str) -> Result<Value, BindError> {
    if matches!(json, Json::Float(_)) {
        return Err(err(path, format!("must be {} without fraction or exponent", describe(kind))));
    }
    match kind {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            let n = integer(json, path, i64::from(i32::MIN), i64::from(i32::MAX))?;
            Ok(Value::I32(i32::try_from(n).map_err(|_| err(path, "is out of range"))?))
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Ok(Value::I64(integer(json, path, i64::MIN, i64::MAX)?))
        }
        Kind::Uint32 | Kind::Fixed32 => {
            let n = integer(json, path, 0, i64::from(u32::MAX))?;
            Ok(Value::U32(u32::try_from(n).map_err(|_| err(path, "is out of range"))?))
        }
        Kind::Uint64 | Kind::Fixed64 => match json {
            Json::Unsigned(v) => Ok(Value::U64(*v)),
            _ => Err(err(path, format!("is out of range (0 to {})", u64::MAX))),
        },
        _ => Err(err(path, format!("must be {}", describe(kind)))),
    }
}

#[allow(clippy::cast_possible_truncation, reason = "protojson reads a float field as the nearest f32")]
fn float(kind: &Kind, json: &Json, path: &str) -> Result<Value, BindError> {
    #[allow(clippy::cast_precision_loss, reason = "a JSON number for a floating-point field")]
    let v = match json {
        Json::Float(v) => *v,
        Json::Signed(v) => *v as f64,
        Json::Unsigned(v) => *v as f64,
        _ => return Err(err(path, "must be a number")),
    };
    if !v.is_finite() {
        return Err(err(path, "must be a finite number"));
    }
    Ok(if matches!(kind, Kind::Float) { Value::F32(v as f32) } else { Value::F64(v) })
}

/// A scalar written as a string: a JSON string for 64-bit integers (and any
/// integer), a map key, a path segment or a query parameter. Integers are
/// plain decimals: no sign but `-`, no leading zeros (some parsers read
/// `010` as octal), no spaces.
pub(crate) fn scalar_from_str(kind: &Kind, raw: &str, path: &str) -> Result<Value, BindError> {
    let bad = || err(path, format!("{raw:?} is not {}", describe(kind)));
    let decimal = |s: &str| {
        let digits = s.strip_prefix('-').unwrap_or(s);
        !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !(digits.len() > 1 && digits.starts_with('0'))
    };
    let value = match kind {
        Kind::String => Value::String(raw.to_owned()),
        Kind::Bool => match raw {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(err(path, format!("{raw:?} is not true or false"))),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 if decimal(raw) => Value::I32(
            raw.parse().map_err(|_| err(path, format!("{raw} is out of range for {}", describe(kind))))?,
        ),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 if decimal(raw) => Value::I64(
            raw.parse().map_err(|_| err(path, format!("{raw} is out of range for {}", describe(kind))))?,
        ),
        Kind::Uint32 | Kind::Fixed32 if decimal(raw) && !raw.starts_with('-') => Value::U32(
            raw.parse().map_err(|_| err(path, format!("{raw} is out of range for {}", describe(kind))))?,
        ),
        Kind::Uint64 | Kind::Fixed64 if decimal(raw) && !raw.starts_with('-') => Value::U64(
            raw.parse().map_err(|_| err(path, format!("{raw} is out of range for {}", describe(kind))))?,
        ),
        Kind::Enum(e) => match e.get_value_by_name(raw) {
            Some(v) => Value::EnumNumber(v.number()),
            None => {
                return Err(err(path, format!("\"{raw}\" is not one of {}", known_values(e))));
            }
        },
        Kind::Float | Kind::Double => {
            let v: f64 = match raw {
                "NaN" | "Infinity" | "-Infinity" => return Err(err(path, "must be a finite number")),
                _ => raw.parse().map_err(|_| bad())?,
            };
            return float(kind, &Json::Float(v), path);
        }
        Kind::Bytes => Value::Bytes(base64_bytes(raw).ok_or_else(bad)?.into()),
        _ => return Err(bad()),
    };
    Ok(value)
}

fn base64_bytes(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    STANDARD.decode(s).or_else(|_| URL_SAFE.decode(s)).ok()
}

/// Well-known types (Timestamp, Duration, wrappers, Struct…) have JSON forms
/// of their own: prost-reflect reads those; the field path is ours.
fn well_known(descriptor: &MessageDescriptor, json: &Json, path: &str) -> Result<DynamicMessage, BindError> {
    no_repeated_keys(json, path)?;
    DynamicMessage::deserialize(descriptor.clone(), to_serde(json))
        .map_err(|e| err(path, format!("is not a valid {}: {e}", descriptor.name())))
}

/// A map key from its text (a JSON object's key, or what a query parameter's
/// brackets hold).
pub(crate) fn map_key(kind: &Kind, raw: &str, path: &str) -> Result<MapKey, BindError> {
    Ok(match scalar_from_str(kind, raw, path)? {
        Value::String(s) => MapKey::String(s),
        Value::Bool(b) => MapKey::Bool(b),
        Value::I32(v) => MapKey::I32(v),
        Value::I64(v) => MapKey::I64(v),
        Value::U32(v) => MapKey::U32(v),
        Value::U64(v) => MapKey::U64(v),
        _ => return Err(err(path, "is not a valid map key")),
    })
}

/// A well-known type from its JSON string form (an RFC 3339 timestamp, a
/// duration like `1.5s`), as a query parameter carries it.
pub(crate) fn well_known_from_str(
    descriptor: &MessageDescriptor,
    raw: &str,
    path: &str,
) -> Result<DynamicMessage, BindError> {
    well_known(descriptor, &Json::String(raw.to_owned()), path)
}

fn no_repeated_keys(json: &Json, path: &str) -> Result<(), BindError> {
    match json {
        Json::Object(entries) => {
            let mut keys = HashSet::new();
            for (key, value) in entries {
                let at = join(path, key);
                if !keys.insert(key.as_str()) {
                    return Err(err(&at, "given more than once"));
                }
                no_repeated_keys(value, &at)?;
            }
            Ok(())
        }
        Json::Array(items) => {
            items.iter().enumerate().try_for_each(|(i, item)| no_repeated_keys(item, &format!("{path}[{i}]")))
        }
        _ => Ok(()),
    }
}

fn to_serde(json: &Json) -> serde_json::Value {
    use serde_json::Value as V;
    match json {
        Json::Null => V::Null,
        Json::Bool(b) => V::Bool(*b),
        Json::Unsigned(v) => V::from(*v),
        Json::Signed(v) => V::from(*v),
        Json::Float(v) => serde_json::Number::from_f64(*v).map_or(V::Null, V::Number),
        Json::String(s) => V::String(s.clone()),
        Json::Array(items) => V::Array(items.iter().map(to_serde).collect()),
        Json::Object(entries) => V::Object(entries.iter().map(|(k, v)| (k.clone(), to_serde(v))).collect()),
    }
}
