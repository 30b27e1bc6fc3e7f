//! Stage keys: what enters a stage's key, and the key itself.
//!
//! A key is blake3 in derive-key mode (domain separation) over length-prefixed canonical JSON
//! parts: code (kind, stage version, newt version), params, upstream *output* digests (so an
//! upstream re-run with identical bytes is an early cutoff), external input *contents* (never
//! names or mtimes) and environment.

use std::collections::BTreeMap;

use newt_cache::Digest;
use serde::{Deserialize, Serialize};

/// Domain-separation context of stage keys. Changing it invalidates every cached result.
pub const KEY_CONTEXT: &str = "newt 2026-11 stage key v1";

/// Everything that enters a stage's key, kept in the manifest so `newt why` can diff it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KeyInputs {
    /// Stage kind, stage version, newt version.
    pub code: BTreeMap<String, String>,
    /// The params routed to this stage.
    pub params: serde_json::Value,
    /// Upstream stage id → output digest.
    pub upstream: BTreeMap<String, String>,
    /// External input (as named in the pipeline) → content digest. Only digests are hashed.
    pub external: BTreeMap<String, String>,
    /// Environment that changes the output.
    pub env: BTreeMap<String, String>,
    /// Inputs fetched from elsewhere, by immutable identity (`models/org/name@<commit>`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub remote: BTreeMap<String, String>,
}

impl KeyInputs {
    /// The stage key.
    pub fn key(&self) -> Digest {
        let code = canonical_json(&serde_json::to_value(&self.code).expect("map serializes"));
        let params = canonical_json(&self.params);
        let upstream = canonical_json(&serde_json::to_value(&self.upstream).expect("map serializes"));
        // Contents, never names: the sorted digests alone.
        let mut external: Vec<&str> = self.external.values().map(String::as_str).collect();
        external.sort();
        let external = external.join("\n");
        let env = canonical_json(&serde_json::to_value(&self.env).expect("map serializes"));
        let mut parts =
            vec![code.as_bytes(), params.as_bytes(), upstream.as_bytes(), external.as_bytes(), env.as_bytes()];
        // Only stages with remote inputs hash a sixth part: every other key stays as it was.
        let remote = canonical_json(&serde_json::to_value(&self.remote).expect("map serializes"));
        if !self.remote.is_empty() {
            parts.push(remote.as_bytes());
        }
        newt_cache::hash_bytes(KEY_CONTEXT, &parts)
    }
}

/// JSON with object keys sorted at every level and no insignificant whitespace.
pub fn canonical_json(v: &serde_json::Value) -> String {
    fn sort(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<_> = m.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sort(&m[k]));
                }
                serde_json::Value::Object(out)
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sort(v)).expect("json serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_contents_not_external_names() {
        let mut a = KeyInputs::default();
        a.external.insert("data/a.jsonl".into(), "00ff".into());
        let mut b = KeyInputs::default();
        b.external.insert("data/renamed.jsonl".into(), "00ff".into());
        assert_eq!(a.key(), b.key());
        b.external.insert("data/renamed.jsonl".into(), "00fe".into());
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn remote_inputs_enter_the_key_and_leave_other_keys_unchanged() {
        let plain = KeyInputs::default();
        let before = plain.key();
        let mut a = KeyInputs::default();
        a.remote.insert("hub".into(), "models/acme/m@aaaa".into());
        let mut b = a.clone();
        b.remote.insert("hub".into(), "models/acme/m@bbbb".into());
        assert_ne!(a.key(), b.key());
        assert_ne!(a.key(), before);
        assert_eq!(KeyInputs::default().key(), before);
        assert!(!serde_json::to_string(&plain).unwrap().contains("remote"));
    }

    #[test]
    fn canonical_json_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":3}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"a":{"x":3,"y":2},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        let mut ka = KeyInputs { params: a, ..Default::default() };
        let kb = KeyInputs { params: b, ..Default::default() };
        assert_eq!(ka.key(), kb.key());
        ka.params["b"] = 2.into();
        assert_ne!(ka.key(), kb.key());
    }
}
