//! Structured outputs: the JSON schemas of steps 2 and 3, built from the category's handbook
//! entry (and, for step 3, from step 2's answer), and the `response_format` spellings that
//! OpenAI-compatible servers read them in.
//!
//! Keys are the handbook's dimensions, each optional, and a key that is written holds at least
//! one value: OpenAI's strict mode would want every key required, but under llama.cpp's grammar
//! that made a 0.5B teacher answer 9 of 20 notes with nothing but empty lists (`BENCHMARKS.md`),
//! so `strict` is off. Every string and list is bounded, so a constrained small model cannot run
//! to the token limit inside one value. Step 3's values are an enum of step 2's writable
//! candidates: a tag the teacher did not ground cannot be written at all.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::prompts::writable_tag;
use crate::{domain::Limits, tagging::handbook::Category, training::distill::Candidate};

/// Most candidates per dimension (step 2 asks for 1 to 5).
pub const MAX_CANDIDATES: usize = 5;
/// Longest evidence string (characters); the committed dataset's longest is 93.
pub const MAX_EVIDENCE_CHARS: usize = 120;

/// A schema with the name a `json_schema` response format carries.
#[derive(Debug, Clone)]
pub struct AnswerSchema {
    /// `^[a-zA-Z0-9_-]{1,64}$`, as OpenAI requires.
    pub name: &'static str,
    /// The JSON schema itself.
    pub schema: Value,
}

/// Step 2: the dimensions of `category` as optional keys, each a list of 1 to
/// [`MAX_CANDIDATES`] `{value, evidence}` objects.
pub fn candidates(category: &Category, limits: &Limits) -> AnswerSchema {
    let item = json!({
        "type": "object",
        "properties": {
            "value": {"type": "string", "minLength": 1, "maxLength": limits.max_tag_chars},
            "evidence": {"type": "string", "maxLength": MAX_EVIDENCE_CHARS},
        },
        "required": ["value", "evidence"],
        "additionalProperties": false,
    });
    let list = json!({"type": "array", "items": item, "minItems": 1, "maxItems": MAX_CANDIDATES});
    object(
        "tag_candidates",
        category
            .dimensions
            .iter()
            .map(|d| (d.key.as_str(), list.clone())),
    )
}

/// Step 3: the dimensions that have writable candidates as optional keys, each a list of 1 to
/// `max_tags_per_dimension` values taken from those candidates. `None` when no candidate can be
/// a tag (then there is nothing to ask).
pub fn tags(
    category: &Category,
    limits: &Limits,
    candidates: &BTreeMap<String, Vec<Candidate>>,
) -> Option<AnswerSchema> {
    let mut props = Vec::new();
    for d in &category.dimensions {
        let mut values: Vec<&str> = Vec::new();
        for c in candidates.get(&d.key).into_iter().flatten() {
            if writable_tag(&c.value, limits) && !values.contains(&c.value.as_str()) {
                values.push(&c.value);
            }
        }
        if !values.is_empty() {
            let list = json!({
                "type": "array",
                "items": {"type": "string", "enum": values},
                "minItems": 1,
                "maxItems": limits.max_tags_per_dimension,
            });
            props.push((d.key.as_str(), list));
        }
    }
    (!props.is_empty()).then(|| object("tags", props))
}

fn object<'a>(
    name: &'static str,
    props: impl IntoIterator<Item = (&'a str, Value)>,
) -> AnswerSchema {
    let properties: serde_json::Map<String, Value> =
        props.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    AnswerSchema {
        name,
        schema: json!({
            "type": "object",
            "properties": properties,
            "additionalProperties": false,
        }),
    }
}

/// How an answer's shape is asked for, strongest first. A server that refuses one (HTTP 400 or
/// 422, or an error naming `response_format`) is asked again with the next (the teacher's
/// client keeps the weaker one for the rest of the run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ResponseFormat {
    /// OpenAI's structured outputs: `{"type": "json_schema", "json_schema": {name, strict:
    /// false, schema}}` (OpenAI, vLLM, SGLang, llama.cpp's server).
    JsonSchema = 0,
    /// `{"type": "json_object", "schema": ...}`: llama-cpp-python's spelling (its server refuses
    /// `json_schema` with HTTP 500, "Input should be 'text' or 'json_object'").
    JsonObjectSchema = 1,
    /// JSON mode without a schema: any JSON object.
    JsonObject = 2,
    /// No `response_format` at all: the prompt alone asks for JSON.
    Text = 3,
}

impl ResponseFormat {
    /// All, strongest first.
    pub const ALL: [ResponseFormat; 4] = [
        ResponseFormat::JsonSchema,
        ResponseFormat::JsonObjectSchema,
        ResponseFormat::JsonObject,
        ResponseFormat::Text,
    ];

    /// The next weaker format, if any.
    pub fn weaker(self) -> Option<ResponseFormat> {
        Self::ALL.get(self as usize + 1).copied()
    }

    /// From its index in [`Self::ALL`].
    pub fn from_index(i: u8) -> ResponseFormat {
        Self::ALL[(i as usize).min(Self::ALL.len() - 1)]
    }

    /// Its name in logs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ResponseFormat::JsonSchema => "json_schema",
            ResponseFormat::JsonObjectSchema => "json_object+schema",
            ResponseFormat::JsonObject => "json_object",
            ResponseFormat::Text => "none",
        }
    }

    /// The request's `response_format` for an answer of `schema`, or `None` to send none.
    pub fn request_field(self, schema: &AnswerSchema) -> Option<Value> {
        match self {
            ResponseFormat::JsonSchema => Some(json!({
                "type": "json_schema",
                "json_schema": {"name": schema.name, "strict": false, "schema": schema.schema},
            })),
            ResponseFormat::JsonObjectSchema => {
                Some(json!({"type": "json_object", "schema": schema.schema}))
            }
            ResponseFormat::JsonObject => Some(json!({"type": "json_object"})),
            ResponseFormat::Text => None,
        }
    }
}

impl std::str::FromStr for ResponseFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s.replace('-', "_"))
            .ok_or_else(|| {
                format!("{s:?}: expected json_schema, json_object+schema, json_object or none")
            })
    }
}

impl std::fmt::Display for ResponseFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::teacher::prompts::tests::sneakers;

    #[test]
    fn step2_schema_names_every_dimension_and_bounds_every_value() {
        let c = sneakers();
        let limits = Limits::default();
        let s = candidates(&c, &limits).schema;
        let mut keys: Vec<&str> = c.dimensions.iter().map(|d| d.key.as_str()).collect();
        keys.sort_unstable();
        let mut props: Vec<&str> = s["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        props.sort_unstable();
        assert_eq!(props, keys);
        assert!(
            s.get("required").is_none(),
            "a note need not name every dimension"
        );
        assert_eq!(s["additionalProperties"], false);
        let brand = &s["properties"]["brand"];
        assert_eq!(
            (&brand["minItems"], &brand["maxItems"]),
            (&json!(1), &json!(MAX_CANDIDATES))
        );
        assert_eq!(
            brand["items"]["properties"]["value"]["maxLength"],
            limits.max_tag_chars
        );
        assert_eq!(
            brand["items"]["properties"]["evidence"]["maxLength"],
            MAX_EVIDENCE_CHARS
        );
    }

    #[test]
    fn step3_schema_allows_only_writable_candidates() {
        let c = sneakers();
        let limits = Limits::default();
        let cand = |v: &str| Candidate {
            value: v.into(),
            evidence: String::new(),
        };
        let mut cands = BTreeMap::new();
        cands.insert(
            "brand".to_string(),
            vec![cand("Nike"), cand("Nike"), cand(&"x".repeat(40))],
        );
        cands.insert("scene".to_string(), vec![cand("a\"b")]);
        let s = tags(&c, &limits, &cands).unwrap().schema;
        assert_eq!(s["properties"].as_object().unwrap().len(), 1);
        assert_eq!(s["properties"]["brand"]["minItems"], 1);
        assert_eq!(s["properties"]["brand"]["items"]["enum"], json!(["Nike"]));
        assert_eq!(
            s["properties"]["brand"]["maxItems"],
            limits.max_tags_per_dimension
        );
        cands.remove("brand");
        assert!(tags(&c, &limits, &cands).is_none());
    }

    #[test]
    fn formats_weaken_in_order_and_spell_the_schema_each_way() {
        let s = AnswerSchema {
            name: "tags",
            schema: json!({"type": "object"}),
        };
        let mut f = ResponseFormat::JsonSchema;
        let mut seen = vec![f.name()];
        while let Some(w) = f.weaker() {
            assert!(w > f);
            f = w;
            seen.push(f.name());
        }
        assert_eq!(
            seen,
            ["json_schema", "json_object+schema", "json_object", "none"]
        );
        let v = ResponseFormat::JsonSchema.request_field(&s).unwrap();
        assert_eq!(v["json_schema"]["schema"], s.schema);
        assert_eq!(v["json_schema"]["strict"], false);
        let v = ResponseFormat::JsonObjectSchema.request_field(&s).unwrap();
        assert_eq!(
            (v["type"].as_str(), &v["schema"]),
            (Some("json_object"), &s.schema)
        );
        assert!(ResponseFormat::Text.request_field(&s).is_none());
        assert_eq!(ResponseFormat::from_index(9), ResponseFormat::Text);
        for f in ResponseFormat::ALL {
            assert_eq!(f.name().parse::<ResponseFormat>(), Ok(f));
        }
        assert_eq!("json-object".parse(), Ok(ResponseFormat::JsonObject));
        assert!("xml".parse::<ResponseFormat>().is_err());
    }
}
