//! proto3 JSON as fluxo writes it everywhere it writes JSON (REST replies,
//! webhook bodies): lowerCamelCase names, enums by name, 64-bit integers as
//! strings, RFC 3339 timestamps, default values written out.

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

static POOL: std::sync::LazyLock<Result<DescriptorPool, prost_reflect::DescriptorError>> =
    std::sync::LazyLock::new(|| DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET));

/// The serializer options of every JSON fluxo writes.
pub fn options() -> SerializeOptions {
    SerializeOptions::new()
        .stringify_64_bit_integers(true)
        .use_proto_field_name(false)
        .use_enum_numbers(false)
        .skip_default_fields(false)
}

/// Why a message could not be written as JSON.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// The descriptor set has no such message.
    #[error("no message {0} in fluxo's descriptors")]
    Unknown(String),
    /// The bytes are not that message.
    #[error("not a {name}: {reason}")]
    Decode {
        /// The message's full name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// `message`, a generated fluxo type whose full proto name is `name`
/// (`fluxo.ledger.v1.Entry`), as a JSON value.
pub fn to_value(name: &str, message: &impl prost::Message) -> Result<serde_json::Value, JsonError> {
    let name = name.to_owned();
    let pool = POOL.as_ref().map_err(|e| JsonError::Unknown(format!("{name} ({e})")))?;
    let descriptor = pool.get_message_by_name(&name).ok_or_else(|| JsonError::Unknown(name.clone()))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|e| JsonError::Decode { name: name.clone(), reason: e.to_string() })?;
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options())
        .map_err(|e| JsonError::Decode { name, reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use crate::ledger_v1 as pb;

    #[test]
    fn an_entry_reads_as_the_rest_api_writes_it() {
        let entry = pb::Entry {
            id: "01JD0000000000000000000000".into(),
            merchant_id: "m-1".into(),
            r#type: pb::EntryType::Debit.into(),
            amount: Some(pb::Money { currency_code: "BRL".into(), minor_units: 1050 }),
            booking_date: "2026-11-21".into(),
            created_at: Some(prost_types::Timestamp { seconds: 1_764_000_000, nanos: 0 }),
            ..Default::default()
        };
        let json = super::to_value("fluxo.ledger.v1.Entry", &entry).unwrap();
        assert_eq!(json["merchantId"], "m-1");
        assert_eq!(json["type"], "DEBIT");
        assert_eq!(json["amount"]["minorUnits"], "1050");
        assert_eq!(json["createdAt"], "2025-11-24T16:00:00Z");
        assert_eq!(json["reversesEntryId"], "", "defaults are written out");
    }
}
