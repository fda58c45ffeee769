//! Proto3 JSON ⇄ protobuf, driven by descriptors: the request message is built
//! from the path, the query string and the body as the route's annotation
//! binds them, and the reply is rendered the way grpc-gateway v2 renders it
//! (lowerCamelCase names, enums by name, 64-bit integers as strings, RFC 3339
//! timestamps, unpopulated fields included).

use bytes::Buf;
use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use crate::routes::Route;

/// A request the gateway cannot turn into a message: a 400 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct BindError {
    /// The path, query parameter or body field at fault.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn bind_error(field: &str, reason: impl Into<String>) -> BindError {
    BindError { field: field.to_owned(), reason: reason.into() }
}

/// Builds the request message for `route` from its bindings.
pub fn request(
    route: &Route,
    path: &[(String, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, BindError> {
    let input = route.rpc.input();
    let mut message =
        if route.body == "*" { parse_json(&input, body, "")? } else { DynamicMessage::new(input.clone()) };
    if !route.body.is_empty() && route.body != "*" {
        let field =
            field_named(&input, &route.body).ok_or_else(|| bind_error(&route.body, "unknown body field"))?;
        let Kind::Message(kind) = field.kind() else {
            return Err(bind_error(&route.body, "body field is not a message"));
        };
        message.set_field(&field, Value::Message(parse_json(&kind, body, &route.body)?));
    }
    // Query parameters bind only fields that neither the path nor the body binds.
    if route.body != "*" {
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            // `name[key]=value` sets one entry of a map field, as grpc-gateway reads it.
            let (name, map_key) = match key.strip_suffix(']').and_then(|k| k.split_once('[')) {
                Some((name, map_key)) => (name, Some(map_key)),
                None => (key.as_ref(), None),
            };
            // Unknown parameters are ignored, as grpc-gateway does.
            let Some(field) = field_named(&input, name) else { continue };
            if route.template.fields().any(|f| f == field.name()) {
                continue;
            }
            match map_key {
                Some(map_key) if field.is_map() => {
                    set_map_entry(&mut message, &field, map_key, &value, &key)?
                }
                Some(_) => return Err(bind_error(&key, format!("{name} is not a map field"))),
                None if field.is_map() => {
                    return Err(bind_error(name, format!("is a map: give each entry as {name}[key]=value")));
                }
                None => set_scalar(&mut message, &field, &key, &value)?,
            }
        }
    }
    for (name, value) in path {
        let field = field_named(&input, name).ok_or_else(|| bind_error(name, "unknown path field"))?;
        set_scalar(&mut message, &field, name, value)?;
    }
    Ok(message)
}

fn field_named(message: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    message.get_field_by_name(name).or_else(|| message.get_field_by_json_name(name))
}

fn parse_json(
    descriptor: &MessageDescriptor,
    body: &[u8],
    prefix: &str,
) -> Result<DynamicMessage, BindError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(descriptor.clone()));
    }
    crate::json::parse(descriptor, body, prefix)
}

/// Sets `map_key` of the map `field` from the query parameter `name`.
fn set_map_entry(
    message: &mut DynamicMessage,
    field: &FieldDescriptor,
    map_key: &str,
    raw: &str,
    name: &str,
) -> Result<(), BindError> {
    let Kind::Message(entry) = field.kind() else { return Err(bind_error(name, "is not a map")) };
    let key = crate::json::map_key(&entry.map_entry_key_field().kind(), map_key, name)?;
    let value = crate::json::scalar_from_str(&entry.map_entry_value_field().kind(), raw, name)?;
    let mut map = match message.get_field(field).into_owned() {
        Value::Map(m) => m,
        _ => Default::default(),
    };
    if map.insert(key, value).is_some() {
        return Err(bind_error(name, "given more than once"));
    }
    message.set_field(field, Value::Map(map));
    Ok(())
}

fn set_scalar(
    message: &mut DynamicMessage,
    field: &FieldDescriptor,
    name: &str,
    raw: &str,
) -> Result<(), BindError> {
    if let Kind::Message(kind) = field.kind() {
        // Well-known types with a string form (Timestamp, Duration, FieldMask)
        // are read as their JSON strings are; other messages cannot be.
        if matches!(
            kind.full_name(),
            "google.protobuf.Timestamp" | "google.protobuf.Duration" | "google.protobuf.FieldMask"
        ) && !field.is_list()
        {
            message.set_field(field, Value::Message(crate::json::well_known_from_str(&kind, raw, name)?));
            return Ok(());
        }
        return Err(bind_error(name, "cannot be set from the URL"));
    }
    let value = crate::json::scalar_from_str(&field.kind(), raw, name)?;
    if field.is_list() {
        let mut list = match message.get_field(field).into_owned() {
            Value::List(l) => l,
            _ => Vec::new(),
        };
        list.push(value);
        message.set_field(field, Value::List(list));
    } else {
        message.set_field(field, value);
    }
    Ok(())
}

/// Renders a reply as proto3 JSON.
pub fn to_json(message: &DynamicMessage) -> Vec<u8> {
    let options = fluxo_proto::json::options();
    let mut out = Vec::with_capacity(256);
    let mut serializer = serde_json::Serializer::new(&mut out);
    if message.serialize_with_options(&mut serializer, &options).is_err() {
        out.clear();
        out.extend_from_slice(b"{}");
    }
    out
}

/// A tonic codec for messages known only by their descriptors.
#[derive(Debug, Clone)]
pub struct DynamicCodec {
    reply: MessageDescriptor,
}

impl DynamicCodec {
    /// Decodes replies as `reply`.
    pub fn new(reply: MessageDescriptor) -> Self {
        Self { reply }
    }
}

/// Encodes requests.
#[derive(Debug)]
pub struct DynamicEncoder;

/// Decodes replies.
#[derive(Debug)]
pub struct DynamicDecoder(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        DynamicDecoder(self.reply.clone())
    }
}

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst).map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let bytes = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.0.clone(), bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding the reply: {e}")))
    }
}
