//! The schema registry: a topic's schema versions (a partition shares its
//! partitioned topic's), JSON under `/schemas/<tenant>/<ns>/<domain>/<topic>`,
//! versions 0, 1, … A producer or `GET_OR_CREATE_SCHEMA` with a schema gets
//! the version of an identical one, else a new version if the namespace's
//! compatibility strategy accepts it (Pulsar's strategies, FULL by default),
//! else `IncompatibleSchema`. A consumer's schema must be readable against
//! the latest one (registered when the topic has none).
//!
//! Compatibility of JSON, Avro and Protobuf schemas (Avro definitions, as
//! Pulsar's clients send them) follows Avro's schema-resolution rules; other
//! types are compatible only with themselves. `can_read` and `compatible`
//! are pure.

use std::collections::BTreeMap;

use base64::Engine;
use magnetar_metadata::MetadataClient;
use magnetar_proto::commands;
use magnetar_proto::pulsar::{schema::Type as WireType, Schema, ServerError};
use magnetar_proto::TopicName;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ownership::namespaces::{Namespaces, Strategy};
use crate::{keys, BrokerError};

/// Versions a topic keeps (a bound; the oldest go first).
pub const MAX_VERSIONS: usize = 1_000;

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSchema {
    pub version: u64,
    /// The wire type (`Schema.Type`).
    pub schema_type: i32,
    pub name: String,
    /// `schema_data`, base64.
    pub data: String,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    pub timestamp: u64,
}

impl StoredSchema {
    pub fn data_bytes(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .unwrap_or_default()
    }

    pub fn to_wire(&self) -> Schema {
        Schema {
            name: self.name.clone(),
            schema_data: self.data_bytes().into(),
            r#type: self.schema_type,
            properties: commands::key_values(&self.properties),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    versions: Vec<StoredSchema>,
    /// The next version number (kept across deletions, as Pulsar does).
    #[serde(default)]
    next: u64,
}

/// Pulsar's `SchemaType` names, by wire type.
pub const TYPE_NAMES: [&str; 22] = [
    "NONE",
    "STRING",
    "JSON",
    "PROTOBUF",
    "AVRO",
    "BOOLEAN",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FLOAT",
    "DOUBLE",
    "DATE",
    "TIME",
    "TIMESTAMP",
    "KEY_VALUE",
    "INSTANT",
    "LOCAL_DATE",
    "LOCAL_TIME",
    "LOCAL_DATE_TIME",
    "PROTOBUF_NATIVE",
    "AUTO_CONSUME",
];

pub fn type_name(t: i32) -> &'static str {
    TYPE_NAMES.get(t as usize).copied().unwrap_or("NONE")
}

pub fn type_of(name: &str) -> Option<i32> {
    TYPE_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as i32)
}

/// Whether a schema means "no schema" (raw bytes, or a consumer that takes
/// whatever the topic has).
pub fn is_none(s: &Schema) -> bool {
    matches!(
        WireType::try_from(s.r#type),
        Ok(WireType::None | WireType::AutoConsume) | Err(_)
    )
}

/// A version number as Pulsar puts it on the wire: 8 bytes, big-endian.
pub fn version_bytes(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

pub fn version_of(bytes: &[u8]) -> Option<u64> {
    let b: [u8; 8] = bytes.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

// ---- compatibility (pure) ----

/// Whether data written with `writer` can be read with `reader` (Avro's
/// resolution rules).
pub fn can_read(reader: &Value, writer: &Value) -> bool {
    match (reader, writer) {
        (Value::Array(rs), Value::Array(ws)) => {
            ws.iter().all(|w| rs.iter().any(|r| can_read(r, w)))
        }
        (_, Value::Array(ws)) => ws.iter().all(|w| can_read(reader, w)),
        (Value::Array(rs), w) => rs.iter().any(|r| can_read(r, w)),
        _ => {
            let (rt, wt) = (kind(reader), kind(writer));
            match (rt.as_str(), wt.as_str()) {
                ("record", "record") => records(reader, writer),
                ("array", "array") => can_read(&reader["items"], &writer["items"]),
                ("map", "map") => can_read(&reader["values"], &writer["values"]),
                ("enum", "enum") => {
                    let symbols = |v: &Value| -> Vec<String> {
                        v["symbols"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|s| s.as_str().map(String::from))
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    let rs = symbols(reader);
                    reader.get("default").is_some()
                        || symbols(writer).iter().all(|s| rs.contains(s))
                }
                ("fixed", "fixed") => reader["size"] == writer["size"],
                (r, w) => r == w || promotes(w, r),
            }
        }
    }
}

/// Avro's promotions: writer type → reader type.
fn promotes(w: &str, r: &str) -> bool {
    matches!(
        (w, r),
        ("int", "long" | "float" | "double")
            | ("long", "float" | "double")
            | ("float", "double")
            | ("string", "bytes")
            | ("bytes", "string")
    )
}

/// A schema's type name: `"int"`, or an object's `type`.
fn kind(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("type") {
            Some(Value::String(s)) => s.clone(),
            Some(inner) => kind(inner),
            None => String::new(),
        },
        _ => String::new(),
    }
}

fn records(reader: &Value, writer: &Value) -> bool {
    let fields = |v: &Value| -> Vec<Value> { v["fields"].as_array().cloned().unwrap_or_default() };
    let wf = fields(writer);
    fields(reader).iter().all(|r| {
        match wf.iter().find(|w| w["name"] == r["name"]) {
            Some(w) => can_read(&r["type"], &w["type"]),
            // A field the writer lacks needs a default.
            None => r.get("default").is_some(),
        }
    })
}

/// A schema to check: its type and its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub schema_type: i32,
    pub data: Vec<u8>,
}

impl From<&StoredSchema> for Candidate {
    fn from(s: &StoredSchema) -> Self {
        Candidate {
            schema_type: s.schema_type,
            data: s.data_bytes(),
        }
    }
}

/// Whether `reader` reads what `writer` wrote.
fn readable(reader: &Candidate, writer: &Candidate) -> bool {
    if reader.schema_type != writer.schema_type {
        return false;
    }
    if reader.data == writer.data {
        return true;
    }
    let structured = matches!(
        WireType::try_from(reader.schema_type),
        Ok(WireType::Json | WireType::Avro | WireType::Protobuf)
    );
    match (
        structured,
        serde_json::from_slice::<Value>(&reader.data),
        serde_json::from_slice::<Value>(&writer.data),
    ) {
        (true, Ok(r), Ok(w)) => can_read(&r, &w),
        _ => false,
    }
}

/// Whether `new` may join `existing` (oldest first) under `strategy`.
pub fn compatible(
    strategy: Strategy,
    existing: &[Candidate],
    new: &Candidate,
) -> Result<(), String> {
    let Some(latest) = existing.last() else {
        return Ok(());
    };
    let against: &[Candidate] = match strategy {
        Strategy::BackwardTransitive | Strategy::ForwardTransitive | Strategy::FullTransitive => {
            existing
        }
        _ => std::slice::from_ref(latest),
    };
    let ok = |old: &Candidate| match strategy {
        Strategy::AlwaysCompatible => true,
        Strategy::AlwaysIncompatible => false,
        Strategy::Backward | Strategy::BackwardTransitive => readable(new, old),
        Strategy::Forward | Strategy::ForwardTransitive => readable(old, new),
        Strategy::Full | Strategy::FullTransitive | Strategy::Undefined => {
            readable(new, old) && readable(old, new)
        }
    };
    match against.iter().position(|old| !ok(old)) {
        None => Ok(()),
        Some(i) => Err(format!(
            "the schema is incompatible with version {} under {strategy:?}",
            existing.len() - against.len() + i
        )),
    }
}

// ---- the registry (metadata) ----

/// Whose schemas a topic has: a partition its partitioned topic's.
fn key(name: &TopicName) -> String {
    let base = name.partition_of().map_or_else(|| name.clone(), |(b, _)| b);
    keys::schema(&base.as_key())
}

async fn read(md: &MetadataClient, name: &TopicName) -> Result<(Record, u64), BrokerError> {
    Ok(match md.get(&key(name)).await? {
        Some(kv) => (
            serde_json::from_slice(&kv.value).map_err(|e| {
                BrokerError::NotServedHere(format!("schemas of {name} do not parse: {e}"))
            })?,
            kv.version,
        ),
        None => (Record::default(), 0),
    })
}

/// Every version of the topic's schema, oldest first.
pub async fn versions(
    md: &MetadataClient,
    name: &TopicName,
) -> Result<Vec<StoredSchema>, BrokerError> {
    Ok(read(md, name).await?.0.versions)
}

/// A version (the latest with `None`).
pub async fn get(
    md: &MetadataClient,
    name: &TopicName,
    version: Option<u64>,
) -> Result<Option<StoredSchema>, BrokerError> {
    let all = versions(md, name).await?;
    Ok(match version {
        None => all.last().cloned(),
        Some(v) => all.into_iter().find(|s| s.version == v),
    })
}

pub async fn strategy(namespaces: &Namespaces, name: &TopicName) -> Result<Strategy, BrokerError> {
    let (p, _) = namespaces.get(&name.namespace()).await?;
    Ok(p.schema_compatibility_strategy.unwrap_or(Strategy::Full))
}

fn incompatible(why: String) -> BrokerError {
    BrokerError::new(ServerError::IncompatibleSchema, why)
}

/// The version of `schema` for the topic: an identical one's, else a new
/// one if compatible.
pub async fn get_or_create(
    md: &MetadataClient,
    namespaces: &Namespaces,
    name: &TopicName,
    schema: &Schema,
) -> Result<u64, BrokerError> {
    let strategy = strategy(namespaces, name).await?;
    let new = Candidate {
        schema_type: schema.r#type,
        data: schema.schema_data.to_vec(),
    };
    for _ in 0..5 {
        let (mut rec, version) = read(md, name).await?;
        if let Some(same) = rec
            .versions
            .iter()
            .rev()
            .find(|s| Candidate::from(*s) == new)
        {
            return Ok(same.version);
        }
        let existing: Vec<Candidate> = rec.versions.iter().map(Candidate::from).collect();
        compatible(strategy, &existing, &new).map_err(incompatible)?;
        let v = rec
            .next
            .max(rec.versions.last().map_or(0, |s| s.version + 1));
        rec.versions.push(StoredSchema {
            version: v,
            schema_type: schema.r#type,
            name: schema.name.clone(),
            data: base64::engine::general_purpose::STANDARD.encode(&schema.schema_data),
            properties: commands::properties(&schema.properties),
            timestamp: crate::managed_ledger::ledger_list::now_ms(),
        });
        if rec.versions.len() > MAX_VERSIONS {
            rec.versions.remove(0);
        }
        rec.next = v + 1;
        let value =
            serde_json::to_vec(&rec).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
        if md.cas(&key(name), version, value, None).await? {
            tracing::info!(topic = %name, version = v, r#type = type_name(schema.r#type), "schema version added");
            return Ok(v);
        }
    }
    Err(BrokerError::NotServedHere(format!(
        "the schemas of {name} keep changing; retry"
    )))
}

/// A consumer's schema: registered when the topic has none; otherwise it
/// must read what the latest version wrote.
pub async fn check_consumer(
    md: &MetadataClient,
    namespaces: &Namespaces,
    name: &TopicName,
    schema: &Schema,
) -> Result<(), BrokerError> {
    let Some(latest) = get(md, name, None).await? else {
        get_or_create(md, namespaces, name, schema).await?;
        return Ok(());
    };
    let strategy = strategy(namespaces, name).await?;
    let consumer = Candidate {
        schema_type: schema.r#type,
        data: schema.schema_data.to_vec(),
    };
    let writer = Candidate::from(&latest);
    if strategy == Strategy::AlwaysCompatible || readable(&consumer, &writer) {
        return Ok(());
    }
    Err(incompatible(format!(
        "the consumer's {} schema cannot read version {} ({}) of {name}",
        type_name(schema.r#type),
        latest.version,
        type_name(latest.schema_type)
    )))
}

/// Deletes every version; the last version number, if there was one.
pub async fn delete(md: &MetadataClient, name: &TopicName) -> Result<Option<u64>, BrokerError> {
    for _ in 0..5 {
        let (mut rec, version) = read(md, name).await?;
        let Some(last) = rec.versions.last().map(|s| s.version) else {
            return Ok(None);
        };
        rec.next = last + 1;
        rec.versions.clear();
        let value =
            serde_json::to_vec(&rec).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
        if md.cas(&key(name), version, value, None).await? {
            return Ok(Some(last));
        }
    }
    Err(BrokerError::NotServedHere(format!(
        "the schemas of {name} keep changing; retry"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn avro(fields: Value) -> Candidate {
        Candidate {
            schema_type: WireType::Avro as i32,
            data: serde_json::to_vec(&json!({"type": "record", "name": "User", "fields": fields}))
                .unwrap_or_default(),
        }
    }

    #[test]
    fn avro_resolution_rules() {
        let v1 = avro(json!([{"name": "name", "type": "string"}]));
        let with_default = avro(json!([
            {"name": "name", "type": "string"},
            {"name": "age", "type": "int", "default": 0}
        ]));
        let without_default = avro(json!([
            {"name": "name", "type": "string"},
            {"name": "age", "type": "int"}
        ]));
        // A field with a default may be added under every strategy.
        assert!(compatible(Strategy::Full, std::slice::from_ref(&v1), &with_default).is_ok());
        // Without a default the new schema cannot read old data.
        assert!(compatible(
            Strategy::Backward,
            std::slice::from_ref(&v1),
            &without_default
        )
        .is_err());
        assert!(compatible(
            Strategy::Forward,
            std::slice::from_ref(&v1),
            &without_default
        )
        .is_ok());
        // Removing a field without a default: old readers cannot read new data.
        assert!(compatible(
            Strategy::Forward,
            std::slice::from_ref(&without_default),
            &v1
        )
        .is_err());
        assert!(compatible(Strategy::Backward, &[without_default], &v1).is_ok());
        // Promotion int -> long is readable one way only.
        let long = avro(json!([{"name": "n", "type": "long"}]));
        let int = avro(json!([{"name": "n", "type": "int"}]));
        assert!(compatible(Strategy::Backward, std::slice::from_ref(&int), &long).is_ok());
        assert!(compatible(Strategy::Full, &[int], &long).is_err());
        // Unions: a nullable field reads a plain one.
        let nullable = avro(json!([{"name": "s", "type": ["null", "string"], "default": null}]));
        let plain = avro(json!([{"name": "s", "type": "string"}]));
        assert!(compatible(Strategy::Backward, &[plain], &nullable).is_ok());
    }

    #[test]
    fn other_types_only_match_themselves_and_strategies_bound_the_check() {
        let string = Candidate {
            schema_type: WireType::String as i32,
            data: vec![],
        };
        let json_schema = avro(json!([]));
        assert!(compatible(Strategy::Full, std::slice::from_ref(&string), &json_schema).is_err());
        assert!(compatible(
            Strategy::AlwaysCompatible,
            std::slice::from_ref(&string),
            &json_schema
        )
        .is_ok());
        assert!(compatible(
            Strategy::AlwaysIncompatible,
            std::slice::from_ref(&string),
            &string
        )
        .is_err());
        assert!(
            compatible(Strategy::Full, &[], &json_schema).is_ok(),
            "the first"
        );
        // Transitive: checked against every version, not the latest only.
        let a = avro(json!([{"name": "x", "type": "int"}]));
        let b =
            avro(json!([{"name": "x", "type": "int"}, {"name": "y", "type": "int", "default": 1}]));
        let c = avro(json!([{"name": "y", "type": "int", "default": 1}]));
        assert!(compatible(Strategy::Backward, &[a.clone(), b.clone()], &c).is_ok());
        assert!(compatible(Strategy::ForwardTransitive, &[a, b], &c).is_err());
    }

    #[test]
    fn versions_travel_as_eight_bytes() {
        assert_eq!(version_of(&version_bytes(7)), Some(7));
        assert_eq!(version_of(&[1, 2]), None);
        assert_eq!(type_of("json"), Some(2));
        assert_eq!(type_name(4), "AVRO");
    }
}
