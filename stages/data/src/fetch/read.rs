//! Reading records out of source files, one at a time, whatever the format: every record
//! becomes a JSON value with its place in the file, and memory stays flat however large the
//! file (JSON arrays are streamed element by element, Parquet batch by batch).

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::DataError;
use crate::error::Place;
use crate::source::Format;
use crate::strategy::str_at;

/// What a reader hands over for each record: the record, or why its text is not one.
pub type Record = Result<Value, Unreadable>;

/// Why a record's text is not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreadable {
    /// Not valid JSON: the parser's message.
    Json(String),
    /// Longer than [`MAX_RECORD_BYTES`]: its length in bytes.
    TooLong(u64),
}

/// Calls `on_record` for every record of `file`. A record whose text is broken but whose
/// neighbours can still be read (a bad JSON line) is passed as `Err`; a file that cannot be read
/// on is an error.
pub fn read_records(
    file: &Path,
    format: Format,
    text_field: &str,
    on_record: &mut dyn FnMut(Place, Record) -> Result<(), DataError>,
) -> Result<(), DataError> {
    match format {
        Format::Json => read_json(file, on_record),
        Format::Text => read_lines(
            file,
            |line| Value::Object(Map::from_iter([(text_field.to_string(), Value::String(line))])),
            on_record,
        ),
        Format::Csv => read_csv(file, on_record),
        Format::Parquet => read_parquet(file, on_record),
    }
}

/// The most bytes one record may hold: 16 MiB of text is millions of tokens, far past any
/// `sequence_len`. A longer line is an error naming it (or, with `skip_invalid_rows`, skipped),
/// never a stall in the tokenizer; it is not even read into memory whole.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// What [`next_line`] found.
enum Line {
    /// A line is in the buffer (without its end-of-line).
    Read,
    /// The line was longer than [`MAX_RECORD_BYTES`] and was skipped; its length.
    TooLong(u64),
    /// End of file.
    End,
}

/// Reads the next line into `line`, at most [`MAX_RECORD_BYTES`] of it.
fn next_line(reader: &mut BufReader<File>, line: &mut String, file: &Path) -> Result<Line, DataError> {
    line.clear();
    let limit = MAX_RECORD_BYTES as u64 + 1;
    let n = (&mut *reader).take(limit).read_line(line).map_err(|e| DataError::io(file, e))?;
    if n == 0 {
        return Ok(Line::End);
    }
    if n as u64 == limit && !line.ends_with('\n') {
        let rest = reader.skip_until(b'\n').map_err(|e| DataError::io(file, e))?;
        line.clear();
        return Ok(Line::TooLong(n as u64 + rest as u64));
    }
    let end = line.trim_end_matches('\n').trim_end_matches('\r').len();
    line.truncate(end);
    Ok(Line::Read)
}

/// The message for a record over the limit.
pub fn too_long(bytes: u64) -> String {
    format!(
        "the record is {:.1} MiB, over newt's limit of {} MiB for one record \
         (fix or drop it, or set skip_invalid_rows: true to skip such records)",
        bytes as f64 / (1 << 20) as f64,
        MAX_RECORD_BYTES >> 20
    )
}

fn open(file: &Path) -> Result<BufReader<File>, DataError> {
    File::open(file).map(|f| BufReader::with_capacity(1 << 20, f)).map_err(|e| DataError::io(file, e))
}

fn read_lines(
    file: &Path,
    mut make: impl FnMut(String) -> Value,
    on_record: &mut dyn FnMut(Place, Record) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut reader = open(file)?;
    let mut line = String::new();
    let mut n = 0;
    loop {
        let read = next_line(&mut reader, &mut line, file)?;
        n += 1;
        match read {
            Line::End => return Ok(()),
            Line::TooLong(bytes) => on_record(Place::Line(n), Err(Unreadable::TooLong(bytes)))?,
            Line::Read => on_record(Place::Line(n), Ok(make(line.clone())))?,
        }
    }
}

/// JSON Lines; a JSON array of records; or an object holding the records in an array (under
/// `data`, or its only array-valued key).
fn read_json(file: &Path, on_record: &mut dyn FnMut(Place, Record) -> Result<(), DataError>) -> Result<(), DataError> {
    let mut reader = open(file)?;
    let first = loop {
        let buf = reader.fill_buf().map_err(|e| DataError::io(file, e))?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(p) => break Some(buf[p]),
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    match first {
        None => Ok(()),
        Some(b'[') => stream_array(file, reader, on_record),
        Some(_) => {
            // JSON Lines, unless the first line is not a whole value (a pretty-printed object).
            let mut first_line = String::new();
            let mut peek = open(file)?;
            while first_line.trim().is_empty() {
                first_line.clear();
                if peek.read_line(&mut first_line).map_err(|e| DataError::io(file, e))? == 0 {
                    break;
                }
            }
            let first_value = serde_json::from_str::<Value>(first_line.trim()).ok();
            // One object holding a `data` array, written on one line, is a container, not a record.
            let container = first_value.as_ref().is_some_and(|v| v.get("data").is_some_and(Value::is_array)) && {
                let mut rest = String::new();
                while rest.trim().is_empty() && peek.read_line(&mut rest).map_err(|e| DataError::io(file, e))? > 0 {}
                rest.trim().is_empty()
            };
            if first_value.is_some() && !container {
                read_json_lines(file, on_record)
            } else {
                stream_array(file, open(file)?, on_record)
            }
        }
    }
}

fn read_json_lines(
    file: &Path,
    on_record: &mut dyn FnMut(Place, Record) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut reader = open(file)?;
    let mut line = String::new();
    let mut n = 0;
    loop {
        let read = next_line(&mut reader, &mut line, file)?;
        n += 1;
        match read {
            Line::End => return Ok(()),
            Line::TooLong(bytes) => {
                on_record(Place::Line(n), Err(Unreadable::TooLong(bytes)))?;
                continue;
            }
            Line::Read if line.trim().is_empty() => continue,
            Line::Read => {}
        }
        let record = serde_json::from_str::<Value>(&line)
            .map_err(|e| Unreadable::Json(format!("column {}: {}", e.column(), strip_position(&e))));
        on_record(Place::Line(n), record)?;
    }
}

/// serde_json's message without its " at line L column C" suffix (the place is reported apart).
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(at) => s[..at].to_string(),
        None => s,
    }
}

/// Streams the elements of a top-level array (or of the record array inside a top-level
/// object) without holding the file in memory.
fn stream_array(
    file: &Path,
    reader: BufReader<File>,
    on_record: &mut dyn FnMut(Place, Record) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let failure: RefCell<Option<DataError>> = RefCell::new(None);
    let sink = Sink { on_record: RefCell::new(on_record), failure: &failure, count: RefCell::new(0) };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let result = (&mut de).deserialize_any(TopVisitor { sink: &sink }).and_then(|_| de.end());
    if let Some(e) = failure.into_inner() {
        return Err(e);
    }
    result.map_err(|e| DataError::Json {
        file: file.to_path_buf(),
        place: Place::Line(e.line()),
        message: strip_position(&e),
    })
}

struct Sink<'a, 'f> {
    on_record: RefCell<&'a mut dyn FnMut(Place, Record) -> Result<(), DataError>>,
    failure: &'f RefCell<Option<DataError>>,
    count: RefCell<usize>,
}

impl Sink<'_, '_> {
    fn push(&self, v: Value) -> Result<(), String> {
        let mut count = self.count.borrow_mut();
        *count += 1;
        (self.on_record.borrow_mut())(Place::Row(*count), Ok(v)).map_err(|e| {
            *self.failure.borrow_mut() = Some(e);
            "stopped".to_string()
        })
    }
}

struct TopVisitor<'s, 'a, 'f> {
    sink: &'s Sink<'a, 'f>,
}

impl<'de> Visitor<'de> for TopVisitor<'_, '_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of records or an object with a `data` array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        RecordsVisitor { sink: self.sink }.visit_seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut found = false;
        while let Some(key) = map.next_key::<String>()? {
            if found && key != "data" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            found |= map.next_value_seed(MaybeRecords { sink: self.sink, data: key == "data" })?;
        }
        if !found {
            return Err(serde::de::Error::custom("the object holds no array of records"));
        }
        Ok(())
    }
}

/// A value that is the record array if it is an array (or under `data`), ignored otherwise.
struct MaybeRecords<'s, 'a, 'f> {
    sink: &'s Sink<'a, 'f>,
    data: bool,
}

impl<'de> DeserializeSeed<'de> for MaybeRecords<'_, '_, '_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MaybeRecords<'_, '_, '_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any value")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
        RecordsVisitor { sink: self.sink }.visit_seq(seq).map(|_| true)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        if self.data {
            return Err(serde::de::Error::custom("`data` is not an array of records"));
        }
        Ok(false)
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

struct RecordsVisitor<'s, 'a, 'f> {
    sink: &'s Sink<'a, 'f>,
}

impl<'de> Visitor<'de> for RecordsVisitor<'_, '_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of records")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(v) = seq.next_element::<Value>()? {
            self.sink.push(v).map_err(serde::de::Error::custom)?;
        }
        Ok(())
    }
}

/// CSV with a header row (RFC 4180 quoting; quoted fields may span lines). Every value is a
/// string; an empty unquoted field is null.
fn read_csv(file: &Path, on_record: &mut dyn FnMut(Place, Record) -> Result<(), DataError>) -> Result<(), DataError> {
    let mut reader = open(file)?;
    let mut header: Option<Vec<String>> = None;
    let mut row = 0;
    while let Some(fields) = csv_record(&mut reader).map_err(|e| DataError::io(file, e))? {
        let Some(names) = &header else {
            header = Some(fields.into_iter().map(|f| f.unwrap_or_default()).collect());
            continue;
        };
        row += 1;
        if fields.len() == 1 && fields[0].is_none() {
            continue; // blank line
        }
        let record = if fields.len() != names.len() {
            Err(Unreadable::Json(format!("{} fields, but the header has {}", fields.len(), names.len())))
        } else {
            Ok(Value::Object(
                names
                    .iter()
                    .cloned()
                    .zip(fields.into_iter().map(|f| f.map(Value::String).unwrap_or(Value::Null)))
                    .collect(),
            ))
        };
        on_record(Place::Row(row), record)?;
    }
    Ok(())
}

/// One CSV record; None at end of input. A field is None when empty and unquoted.
fn csv_record(reader: &mut impl BufRead) -> std::io::Result<Option<Vec<Option<String>>>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut fields = Vec::new();
    let mut field = String::new();
    let (mut quoted, mut in_quotes, mut chars) = (false, false, line.chars().collect::<Vec<_>>());
    let mut i = 0;
    loop {
        if i >= chars.len() {
            if in_quotes {
                // A quoted field continues on the next line.
                let mut more = String::new();
                if reader.read_line(&mut more)? == 0 {
                    break;
                }
                chars.extend(more.chars());
                continue;
            }
            break;
        }
        let c = chars[i];
        i += 1;
        match (in_quotes, c) {
            (true, '"') if chars.get(i) == Some(&'"') => {
                field.push('"');
                i += 1;
            }
            (true, '"') => in_quotes = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => {
                in_quotes = true;
                quoted = true;
            }
            (false, ',') => {
                fields.push(if field.is_empty() && !quoted { None } else { Some(std::mem::take(&mut field)) });
                quoted = false;
            }
            (false, '\n') => break,
            (false, '\r') if chars.get(i) == Some(&'\n') => {}
            (false, c) => field.push(c),
        }
    }
    fields.push(if field.is_empty() && !quoted { None } else { Some(field) });
    Ok(Some(fields))
}

fn read_parquet(
    file: &Path,
    on_record: &mut dyn FnMut(Place, Record) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let f = File::open(file).map_err(|e| DataError::io(file, e))?;
    let parquet_err = |source| DataError::Parquet { path: file.to_path_buf(), source };
    // The parquet and arrow crates panic on some damaged metadata (an unknown type id in the
    // embedded Arrow schema, found by tests/fuzz_readers.rs): such a file is an error here.
    let damaged =
        |_| DataError::io(file, std::io::Error::other("damaged Parquet metadata (the Parquet reader gave up on it)"));
    let mut reader = std::panic::catch_unwind(|| {
        ParquetRecordBatchReaderBuilder::try_new(f).and_then(|b| b.with_batch_size(1024).build())
    })
    .map_err(damaged)?
    .map_err(parquet_err)?;
    let mut row = 0;
    while let Some(batch) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.next())).map_err(damaged)? {
        let batch = batch?;
        let schema = batch.schema();
        for i in 0..batch.num_rows() {
            row += 1;
            let record = schema
                .fields()
                .iter()
                .zip(batch.columns())
                .map(|(f, c)| (f.name().clone(), cell(c.as_ref(), i)))
                .collect();
            on_record(Place::Row(row), Ok(Value::Object(record)))?;
        }
    }
    Ok(())
}

/// One Arrow cell as JSON (the types datasets hold: strings, numbers, booleans, lists, structs).
fn cell(a: &dyn Array, i: usize) -> Value {
    use arrow::datatypes as t;
    if a.is_null(i) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            Value::String(str_at(a, i).unwrap_or_default().to_string())
        }
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => a.as_primitive::<t::Int8Type>().value(i).into(),
        DataType::Int16 => a.as_primitive::<t::Int16Type>().value(i).into(),
        DataType::Int32 => a.as_primitive::<t::Int32Type>().value(i).into(),
        DataType::Int64 => a.as_primitive::<t::Int64Type>().value(i).into(),
        DataType::UInt8 => a.as_primitive::<t::UInt8Type>().value(i).into(),
        DataType::UInt16 => a.as_primitive::<t::UInt16Type>().value(i).into(),
        DataType::UInt32 => a.as_primitive::<t::UInt32Type>().value(i).into(),
        DataType::UInt64 => a.as_primitive::<t::UInt64Type>().value(i).into(),
        DataType::Float32 => Value::from(a.as_primitive::<t::Float32Type>().value(i) as f64),
        DataType::Float64 => Value::from(a.as_primitive::<t::Float64Type>().value(i)),
        DataType::List(_) | DataType::LargeList(_) => {
            let (range, values) = crate::strategy::list_at(a, i).expect("not null");
            Value::Array(range.map(|j| cell(values.as_ref(), j)).collect())
        }
        DataType::Struct(fields) => {
            let s = a.as_struct();
            Value::Object(
                fields.iter().zip(s.columns()).map(|(f, c)| (f.name().clone(), cell(c.as_ref(), i))).collect(),
            )
        }
        other => Value::String(format!("<unsupported {other}>")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_commas_and_newlines() {
        let text = "a,b,c\n\"x, y\",\"line1\nline2\",\n\"he said \"\"hi\"\"\",,z\n";
        let mut r = std::io::Cursor::new(text);
        let header = csv_record(&mut r).unwrap().unwrap();
        assert_eq!(header, vec![Some("a".into()), Some("b".into()), Some("c".into())]);
        assert_eq!(csv_record(&mut r).unwrap().unwrap(), vec![Some("x, y".into()), Some("line1\nline2".into()), None]);
        assert_eq!(csv_record(&mut r).unwrap().unwrap(), vec![Some("he said \"hi\"".into()), None, Some("z".into())]);
        assert_eq!(csv_record(&mut r).unwrap(), None);
    }
}
