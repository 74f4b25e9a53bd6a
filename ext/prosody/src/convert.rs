//! Conversions between Ruby values and JSON / configuration values.
//!
//! Ruby values here live on the machine stack (where Ruby's GC finds them) or
//! inside Ruby containers; they are never collected into Rust heap structures.

use std::collections::BTreeMap;

use magnus::rb_sys::FromRawValue;
use magnus::value::ReprValue;
use magnus::{Error, Float, Integer, IntoValue, RArray, RHash, RString, Ruby, Symbol, Value};
use prosody::OptionValue;
use serde_json::{Map, Number, Value as Json};

use crate::errors::{error, Kind};

/// Deeper payloads are refused rather than risk the caller's (possibly small fiber) stack.
const MAX_DEPTH: usize = 64;

/// Ruby value → JSON. Hash keys may be Strings or Symbols.
pub(crate) fn to_json(ruby: &Ruby, value: Value) -> Result<Json, Error> {
    to_json_at(ruby, value, 0)
}

fn to_json_at(ruby: &Ruby, value: Value, depth: usize) -> Result<Json, Error> {
    if depth > MAX_DEPTH {
        return Err(error(
            ruby,
            Kind::InvalidMessage,
            format!("payload nests deeper than {MAX_DEPTH} levels"),
        ));
    }
    if value.is_nil() {
        return Ok(Json::Null);
    }
    if value.is_kind_of(ruby.class_true_class()) {
        return Ok(Json::Bool(true));
    }
    if value.is_kind_of(ruby.class_false_class()) {
        return Ok(Json::Bool(false));
    }
    if let Some(text) = RString::from_value(value) {
        return Ok(Json::String(utf8(ruby, text)?));
    }
    if let Some(symbol) = Symbol::from_value(value) {
        return Ok(Json::String(symbol.name()?.into_owned()));
    }
    if let Some(integer) = Integer::from_value(value) {
        return match integer.to_i64() {
            Ok(number) => Ok(Json::Number(number.into())),
            Err(_) => integer
                .to_u64()
                .map(|number| Json::Number(number.into()))
                .map_err(|_| {
                    error(
                        ruby,
                        Kind::InvalidMessage,
                        "payload integer does not fit in 64 bits",
                    )
                }),
        };
    }
    if let Some(float) = Float::from_value(value) {
        return Number::from_f64(float.to_f64())
            .map(Json::Number)
            .ok_or_else(|| {
                error(
                    ruby,
                    Kind::InvalidMessage,
                    "payload contains NaN or Infinity, which JSON cannot carry",
                )
            });
    }
    if let Some(array) = RArray::from_value(value) {
        let mut items = Vec::with_capacity(array.len());
        for index in 0..array.len() {
            let item: Value = array.entry(isize::try_from(index).unwrap_or(isize::MAX))?;
            items.push(to_json_at(ruby, item, depth + 1)?);
        }
        return Ok(Json::Array(items));
    }
    if let Some(hash) = RHash::from_value(value) {
        let mut object = Map::new();
        let mut failure = None;
        hash.foreach(|key: Value, item: Value| {
            let key = match key_name(ruby, key, "payload hash key") {
                Ok(key) => key,
                Err(problem) => {
                    failure = Some(problem);
                    return Ok(magnus::r_hash::ForEach::Stop);
                }
            };
            match to_json_at(ruby, item, depth + 1) {
                Ok(item) => {
                    object.insert(key, item);
                    Ok(magnus::r_hash::ForEach::Continue)
                }
                Err(problem) => {
                    failure = Some(problem);
                    Ok(magnus::r_hash::ForEach::Stop)
                }
            }
        })?;
        return match failure {
            Some(problem) => Err(problem),
            None => Ok(Json::Object(object)),
        };
    }
    let class = class_name(value);
    Err(error(
        ruby,
        Kind::InvalidMessage,
        format!("payload contains a {class}, which is not a JSON value (use Hash, Array, String, Numeric, true, false or nil)"),
    ))
}

/// A Hash key as text; `what` names the key in the error ("payload hash key").
fn key_name(ruby: &Ruby, key: Value, what: &str) -> Result<String, Error> {
    if let Some(text) = RString::from_value(key) {
        return utf8(ruby, text);
    }
    if let Some(symbol) = Symbol::from_value(key) {
        return Ok(symbol.name()?.into_owned());
    }
    Err(error(
        ruby,
        Kind::InvalidMessage,
        format!("{what} {} is not a String or Symbol", class_name(key)),
    ))
}

fn utf8(ruby: &Ruby, text: RString) -> Result<String, Error> {
    utf8_named(ruby, text, "a payload string")
}

/// `text` as Rust UTF-8, or an `InvalidMessageError` naming `what` and showing
/// the offending bytes escaped (`"\xFF\x00"`). Binary (ASCII-8BIT) strings
/// are accepted when their bytes happen to be valid UTF-8.
fn utf8_named(ruby: &Ruby, text: RString, what: &str) -> Result<String, Error> {
    // SAFETY: the bytes are copied out at once, before any Ruby code can run
    // and change or free the string.
    let bytes = unsafe { text.as_slice() }.to_vec();
    String::from_utf8(bytes).map_err(|invalid| {
        error(
            ruby,
            Kind::InvalidMessage,
            format!(
                "{what} is not valid UTF-8: \"{}\" (Prosody keys, topics and headers are text; encode binary data, e.g. as hex or Base64)",
                invalid.as_bytes().escape_ascii()
            ),
        )
    })
}

/// `text` as Rust UTF-8, invalid bytes replaced (U+FFFD): for text that is
/// only shown, such as an exception's message, where losing it is worse.
pub(crate) fn lossy(text: RString) -> String {
    // SAFETY: the bytes are copied out at once, before any Ruby code can run
    // and change or free the string.
    String::from_utf8_lossy(unsafe { text.as_slice() }).into_owned()
}

/// A `topic` or `key` argument: a non-empty String of valid UTF-8.
pub(crate) fn text_argument(ruby: &Ruby, value: Value, name: &str) -> Result<String, Error> {
    let Some(text) = RString::from_value(value) else {
        return Err(error(
            ruby,
            Kind::InvalidMessage,
            format!(
                "{name} must be a non-empty String, got {}",
                class_name(value)
            ),
        ));
    };
    let text = utf8_named(ruby, text, name)?;
    if text.is_empty() {
        return Err(error(
            ruby,
            Kind::InvalidMessage,
            format!("{name} must be a non-empty String"),
        ));
    }
    Ok(text)
}

fn class_name(value: Value) -> String {
    value.class().inspect()
}

/// The frozen, deduplicated ("f") String with `text`'s contents: built once per
/// distinct text and shared (what Ruby does for literal and Hash-key strings).
pub(crate) fn interned(_ruby: &Ruby, text: &str) -> Value {
    let len = std::os::raw::c_long::try_from(text.len()).unwrap_or(std::os::raw::c_long::MAX);
    // SAFETY: `_ruby` proves this is a Ruby thread holding the GVL; `text` is
    // valid for `len` bytes during the call, which copies them (like magnus's
    // `str_new`, only allocation failure could raise, and that aborts anyway).
    let raw = unsafe {
        rb_sys::rb_enc_interned_str(text.as_ptr().cast(), len, rb_sys::rb_utf8_encoding())
    };
    // SAFETY: `rb_enc_interned_str` returns a live String VALUE.
    unsafe { Value::from_raw(raw) }
}

/// JSON → Ruby value, with String hash keys (frozen and shared, as Ruby makes them).
pub(crate) fn from_json(ruby: &Ruby, json: &Json) -> Result<Value, Error> {
    Ok(match json {
        Json::Null => ruby.qnil().as_value(),
        Json::Bool(flag) => flag.into_value_with(ruby),
        Json::Number(number) => {
            if let Some(integer) = number.as_i64() {
                integer.into_value_with(ruby)
            } else if let Some(integer) = number.as_u64() {
                integer.into_value_with(ruby)
            } else {
                number.as_f64().unwrap_or(f64::NAN).into_value_with(ruby)
            }
        }
        Json::String(text) => ruby.str_new(text).as_value(),
        Json::Array(items) => {
            let array = ruby.ary_new_capa(items.len());
            for item in items {
                array.push(from_json(ruby, item)?)?;
            }
            array.as_value()
        }
        Json::Object(object) => {
            let hash = ruby.hash_new();
            for (key, item) in object {
                hash.aset(interned(ruby, key), from_json(ruby, item)?)?;
            }
            hash.as_value()
        }
    })
}

/// Headers Hash{String=>String} → pairs.
pub(crate) fn headers(ruby: &Ruby, value: Value) -> Result<Vec<(String, String)>, Error> {
    if value.is_nil() {
        return Ok(Vec::new());
    }
    let Some(hash) = RHash::from_value(value) else {
        return Err(error(
            ruby,
            Kind::InvalidMessage,
            "headers must be a Hash of String => String",
        ));
    };
    let mut pairs = Vec::with_capacity(hash.len());
    hash.foreach(|key: Value, item: Value| {
        let key = match RString::from_value(key) {
            Some(name) => utf8_named(ruby, name, "a header name")?,
            None => key_name(ruby, key, "header name")?,
        };
        let Some(item) = RString::from_value(item) else {
            return Err(error(
                ruby,
                Kind::InvalidMessage,
                format!("header `{key}` must have a String value"),
            ));
        };
        let value = utf8_named(ruby, item, &format!("header `{key}`"))?;
        pairs.push((key, value));
        Ok(magnus::r_hash::ForEach::Continue)
    })?;
    Ok(pairs)
}

/// Options Hash{String=>value} → `(name, OptionValue)` pairs.
pub(crate) fn options(ruby: &Ruby, hash: RHash) -> Result<Vec<(String, OptionValue)>, Error> {
    let mut pairs = Vec::with_capacity(hash.len());
    hash.foreach(|name: Value, value: Value| {
        let name = key_name(ruby, name, "option name").map_err(|_| {
            error(
                ruby,
                Kind::Configuration,
                "option names must be Strings or Symbols",
            )
        })?;
        let converted = option_value(ruby, value).map_err(|reason| {
            error(
                ruby,
                Kind::Configuration,
                format!("invalid option `{name}`: {reason}"),
            )
        })?;
        if let Some(converted) = converted {
            pairs.push((name, converted));
        }
        Ok(magnus::r_hash::ForEach::Continue)
    })?;
    Ok(pairs)
}

/// `None` for nil (meaning "not set").
fn option_value(ruby: &Ruby, value: Value) -> Result<Option<OptionValue>, String> {
    if value.is_nil() {
        return Ok(None);
    }
    if value.is_kind_of(ruby.class_true_class()) {
        return Ok(Some(OptionValue::Bool(true)));
    }
    if value.is_kind_of(ruby.class_false_class()) {
        return Ok(Some(OptionValue::Bool(false)));
    }
    if let Some(text) = RString::from_value(value) {
        return text
            .to_string()
            .map(|text| Some(OptionValue::Str(text)))
            .map_err(|_| "not valid UTF-8".to_owned());
    }
    if let Some(symbol) = Symbol::from_value(value) {
        return symbol
            .name()
            .map(|name| Some(OptionValue::Str(name.into_owned())))
            .map_err(|error| error.to_string());
    }
    if let Some(integer) = Integer::from_value(value) {
        return integer
            .to_i64()
            .map(|number| Some(OptionValue::Int(number)))
            .map_err(|_| "integer out of range".to_owned());
    }
    if let Some(float) = Float::from_value(value) {
        return Ok(Some(OptionValue::Float(float.to_f64())));
    }
    if let Some(array) = RArray::from_value(value) {
        let mut items = Vec::with_capacity(array.len());
        for index in 0..array.len() {
            let item: Value = array
                .entry(isize::try_from(index).unwrap_or(isize::MAX))
                .map_err(|error| error.to_string())?;
            match option_value(ruby, item)? {
                Some(OptionValue::Str(text)) => items.push(text),
                _ => return Err("expected a list of strings".to_owned()),
            }
        }
        return Ok(Some(OptionValue::List(items)));
    }
    if let Some(hash) = RHash::from_value(value) {
        let mut map = BTreeMap::new();
        let mut failure = None;
        hash.foreach(|key: Value, item: Value| {
            let key = option_value(ruby, key);
            let item = option_value(ruby, item);
            match (key, item) {
                (Ok(Some(OptionValue::Str(key))), Ok(Some(OptionValue::Str(item)))) => {
                    map.insert(key, item);
                }
                (Ok(Some(OptionValue::Str(key))), Ok(Some(OptionValue::Int(item)))) => {
                    map.insert(key, item.to_string());
                }
                (Ok(Some(OptionValue::Str(key))), Ok(Some(OptionValue::Bool(item)))) => {
                    map.insert(key, item.to_string());
                }
                _ => failure = Some("expected a Hash of String => String".to_owned()),
            }
            Ok(magnus::r_hash::ForEach::Continue)
        })
        .map_err(|error| error.to_string())?;
        return match failure {
            Some(reason) => Err(reason),
            None => Ok(Some(OptionValue::Map(map))),
        };
    }
    Err(format!("unsupported value of class {}", class_name(value)))
}
