//! Checking each record against the dataset's `type:` and writing it in newt's normalized
//! columns, so that tokenize reads one shape per type whatever the source looked like:
//!
//! | type | columns |
//! | --- | --- |
//! | chat_template | `messages: list<struct<role: utf8, content: utf8, train: bool (nullable)>>` |
//! | alpaca | `instruction: utf8`, `input: utf8 (nullable)`, `output: utf8` |
//! | completion | `text: utf8` |
//! | input_output | `segments: list<struct<text: utf8, label: bool>>` |
//!
//! For chat datasets the Axolotl per-message mapping happens here (`field_messages`,
//! `message_property_mappings` / `message_field_role` / `message_field_content`, `roles`,
//! `message_field_training`, a top-level `system` field, `drop_system_message`), mirroring
//! ChatTemplateStrategy.get_conversation_thread / transform_message.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayBuilder, ArrayRef, BooleanBuilder, ListArray, RecordBatch, StringBuilder, StructArray};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use newt_config::DatasetConfig;
use serde_json::Value;

use crate::DataError;
use crate::strategy::{dataset_type, role_map};

/// A field problem: the field's path in the record and what is wrong.
pub type FieldError = (String, String);

/// A chat turn after mapping: role, content, per-message train flag.
type Turn<'v> = (String, &'v str, Option<bool>);

enum Kind {
    Chat {
        field: String,
        role: String,
        content: String,
        train: Option<String>,
        roles: HashMap<String, String>,
        drop_system: bool,
    },
    Alpaca,
    Completion {
        field: String,
    },
    InputOutput,
}

/// Validates records of one type and accumulates them as Arrow columns.
pub struct Normalizer {
    kind: Kind,
    type_name: String,
    rows: usize,
    // chat_template / input_output: flattened list items and per-row offsets
    offsets: Vec<i32>,
    a: StringBuilder,
    b: StringBuilder,
    c: StringBuilder,
    flag: BooleanBuilder,
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn string<'v>(record: &'v Value, key: &str, path: impl FnOnce() -> String) -> Result<&'v str, FieldError> {
    match record.get(key) {
        Some(Value::String(s)) => Ok(s),
        None => Err((path(), "missing".into())),
        Some(other) => Err((path(), format!("expected a string, found {}", type_of(other)))),
    }
}

fn list_item_schema(fields: Fields) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Struct(fields), false)))
}

fn message_fields() -> Fields {
    Fields::from(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
        Field::new("train", DataType::Boolean, true),
    ])
}

fn segment_fields() -> Fields {
    Fields::from(vec![Field::new("text", DataType::Utf8, false), Field::new("label", DataType::Boolean, false)])
}

impl Normalizer {
    /// The normalizer for a dataset entry's `type:`.
    pub fn new(ds: &DatasetConfig) -> Result<Self, DataError> {
        let type_name = dataset_type(ds)?.to_string();
        let kind = match type_name.as_str() {
            "chat_template" => {
                let mappings = ds.message_property_mappings.clone().unwrap_or_default();
                let role =
                    mappings.get("role").or(ds.message_field_role.as_ref()).cloned().unwrap_or_else(|| "role".into());
                let content = mappings
                    .get("content")
                    .or(ds.message_field_content.as_ref())
                    .cloned()
                    .unwrap_or_else(|| "content".into());
                Kind::Chat {
                    field: ds.field_messages.clone().unwrap_or_else(|| "messages".into()),
                    role,
                    content,
                    train: ds.message_field_training.clone(),
                    roles: role_map(ds),
                    drop_system: ds.drop_system_message.unwrap_or(false),
                }
            }
            "alpaca" => Kind::Alpaca,
            "completion" => Kind::Completion { field: ds.field.clone().unwrap_or_else(|| "text".into()) },
            _ => Kind::InputOutput,
        };
        Ok(Normalizer {
            kind,
            type_name,
            rows: 0,
            offsets: vec![0],
            a: StringBuilder::new(),
            b: StringBuilder::new(),
            c: StringBuilder::new(),
            flag: BooleanBuilder::new(),
        })
    }

    /// The normalized schema of this type.
    pub fn schema(&self) -> SchemaRef {
        Arc::new(match &self.kind {
            Kind::Chat { .. } => Schema::new(vec![Field::new("messages", list_item_schema(message_fields()), false)]),
            Kind::Alpaca => Schema::new(vec![
                Field::new("instruction", DataType::Utf8, false),
                Field::new("input", DataType::Utf8, true),
                Field::new("output", DataType::Utf8, false),
            ]),
            Kind::Completion { .. } => Schema::new(vec![Field::new("text", DataType::Utf8, false)]),
            Kind::InputOutput => Schema::new(vec![Field::new("segments", list_item_schema(segment_fields()), false)]),
        })
    }

    /// The fields a record of this type must have.
    pub fn expected_fields(&self) -> Vec<String> {
        match &self.kind {
            Kind::Chat { field, .. } => vec![field.clone()],
            Kind::Alpaca => vec!["instruction".into(), "input (optional)".into(), "output".into()],
            Kind::Completion { field } => vec![field.clone()],
            Kind::InputOutput => vec!["segments".into()],
        }
    }

    /// The declared type name.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// Whether `record` has none of this type's fields: the dataset is not of this type at all.
    pub fn misfits(&self, record: &Value) -> bool {
        let Some(obj) = record.as_object() else { return false };
        let required: &[&str] = match &self.kind {
            Kind::Chat { field, .. } => &[field.as_str()],
            Kind::Alpaca => &["instruction", "output"],
            Kind::Completion { field } => &[field.as_str()],
            Kind::InputOutput => &["segments"],
        };
        !required.iter().any(|k| obj.contains_key(*k))
    }

    /// Rows accumulated since the last batch.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no row is waiting for the next batch.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Validates a record and appends it; on error nothing is appended.
    pub fn push(&mut self, record: &Value) -> Result<(), FieldError> {
        if !record.is_object() {
            return Err(("(record)".into(), format!("expected an object, found {}", type_of(record))));
        }
        match &self.kind {
            Kind::Chat { .. } => {
                let turns = self.chat_turns(record)?;
                for (role, content, train) in turns {
                    self.a.append_value(role);
                    self.b.append_value(content);
                    self.flag.append_option(train);
                }
                self.offsets.push(self.a.len() as i32);
            }
            Kind::Alpaca => {
                let instruction = string(record, "instruction", || "instruction".into())?;
                let input = match record.get("input") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.as_str()),
                    Some(other) => {
                        return Err(("input".into(), format!("expected a string, found {}", type_of(other))));
                    }
                };
                let output = string(record, "output", || "output".into())?;
                self.a.append_value(instruction);
                self.b.append_option(input);
                self.c.append_value(output);
            }
            Kind::Completion { field } => {
                let text = string(record, field, || field.clone())?;
                self.a.append_value(text);
            }
            Kind::InputOutput => {
                let segments = match record.get("segments") {
                    Some(Value::Array(s)) => s,
                    None => return Err(("segments".into(), "missing".into())),
                    Some(other) => {
                        return Err((
                            "segments".into(),
                            format!("expected a list of segments, found {}", type_of(other)),
                        ));
                    }
                };
                let mut parsed = Vec::with_capacity(segments.len());
                for (j, seg) in segments.iter().enumerate() {
                    let text = string(seg, "text", || format!("segments[{j}].text"))?;
                    let label = match seg.get("label") {
                        Some(Value::Bool(b)) => *b,
                        None => return Err((format!("segments[{j}].label"), "missing".into())),
                        Some(other) => {
                            return Err((
                                format!("segments[{j}].label"),
                                format!("expected a boolean, found {}", type_of(other)),
                            ));
                        }
                    };
                    parsed.push((text, label));
                }
                for (text, label) in parsed {
                    self.a.append_value(text);
                    self.flag.append_value(label);
                }
                self.offsets.push(self.a.len() as i32);
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// A chat record's turns after Axolotl's mapping: (role, content, train flag).
    fn chat_turns<'v>(&self, record: &'v Value) -> Result<Vec<Turn<'v>>, FieldError> {
        let Kind::Chat { field, role, content, train, roles, drop_system } = &self.kind else { unreachable!() };
        let messages = match record.get(field) {
            Some(Value::Array(m)) if !m.is_empty() => m,
            Some(Value::Array(_)) => return Err((field.clone(), "the conversation has no messages".into())),
            None => return Err((field.clone(), "missing".into())),
            Some(other) => {
                return Err((field.clone(), format!("expected a list of messages, found {}", type_of(other))));
            }
        };
        let mut turns = Vec::with_capacity(messages.len() + 1);
        for (j, m) in messages.iter().enumerate() {
            if !m.is_object() {
                return Err((format!("{field}[{j}]"), format!("expected a message object, found {}", type_of(m))));
            }
            let r = string(m, role, || format!("{field}[{j}].{role}"))?;
            let c = string(m, content, || format!("{field}[{j}].{content}"))?;
            let t = match train.as_ref().and_then(|k| m.get(k).map(|v| (k, v))) {
                None | Some((_, Value::Null)) => None,
                Some((_, Value::Bool(b))) => Some(*b),
                Some((k, other)) => {
                    return Err((format!("{field}[{j}].{k}"), format!("expected a boolean, found {}", type_of(other))));
                }
            };
            turns.push((roles.get(r).cloned().unwrap_or_else(|| r.to_string()), c, t));
        }
        // Axolotl's field_system: a top-level system prompt, used when the first turn is not one.
        if let Some(Value::String(system)) = record.get("system")
            && turns[0].0 != "system"
        {
            turns.insert(0, ("system".into(), system.as_str(), None));
        }
        if *drop_system && turns[0].0 == "system" {
            turns.remove(0);
        }
        if turns.is_empty() {
            return Err((field.clone(), "no messages left after drop_system_message".into()));
        }
        Ok(turns)
    }

    /// The accumulated rows as a batch of the normalized schema; starts a new batch.
    pub fn finish_batch(&mut self) -> Result<RecordBatch, DataError> {
        let schema = self.schema();
        let columns: Vec<ArrayRef> = match &self.kind {
            Kind::Chat { .. } => {
                let fields = message_fields();
                let structs = StructArray::try_new(
                    fields.clone(),
                    vec![Arc::new(self.a.finish()), Arc::new(self.b.finish()), Arc::new(self.flag.finish())],
                    None,
                )?;
                vec![Arc::new(self.take_list(fields, structs)?)]
            }
            Kind::InputOutput => {
                let fields = segment_fields();
                let structs = StructArray::try_new(
                    fields.clone(),
                    vec![Arc::new(self.a.finish()), Arc::new(self.flag.finish())],
                    None,
                )?;
                vec![Arc::new(self.take_list(fields, structs)?)]
            }
            Kind::Alpaca => vec![Arc::new(self.a.finish()), Arc::new(self.b.finish()), Arc::new(self.c.finish())],
            Kind::Completion { .. } => vec![Arc::new(self.a.finish())],
        };
        self.rows = 0;
        Ok(RecordBatch::try_new(schema, columns)?)
    }

    fn take_list(&mut self, fields: Fields, values: StructArray) -> Result<ListArray, DataError> {
        let offsets = std::mem::replace(&mut self.offsets, vec![0]);
        Ok(ListArray::try_new(
            Arc::new(Field::new_list_field(DataType::Struct(fields), false)),
            OffsetBuffer::new(ScalarBuffer::from(offsets)),
            Arc::new(values),
            None,
        )?)
    }
}

/// A type whose fields `record` has, to suggest when the declared one does not fit.
pub fn suggest_type(record: &Value) -> Option<&'static str> {
    let obj = record.as_object()?;
    let has = |k: &str| obj.contains_key(k);
    if has("messages") || has("conversations") {
        Some("chat_template")
    } else if has("instruction") && has("output") {
        Some("alpaca")
    } else if has("segments") {
        Some("input_output")
    } else if has("text") {
        Some("completion")
    } else {
        None
    }
}
