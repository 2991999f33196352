//! Model output -> tags. The parser is lenient (a small model often breaks JSON: truncation, missing
//! commas, bare words), keeps what is valid, and counts what it dropped. Values are normalized so
//! that `ＡＩＲ  Jordan` and `air jordan` are one tag.

use std::collections::HashSet;

use unicode_normalization::UnicodeNormalization;

use crate::{config::Limits, domain::Tag, handbook::Category};

/// Normalizes a tag value: Unicode NFKC, trimmed, inner whitespace runs collapsed to one space,
/// Latin letters lowercased. Other scripts keep their case.
pub fn normalize(value: &str) -> String {
    let nfkc: String = value.nfkc().collect();
    let mut out = String::with_capacity(nfkc.len());
    for word in nfkc.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        for c in word.chars() {
            if is_latin(c) {
                out.extend(c.to_lowercase());
            } else {
                out.push(c);
            }
        }
    }
    out
}

fn is_latin(c: char) -> bool {
    matches!(c as u32,
        0x41..=0x5A | 0x61..=0x7A      // Basic Latin letters
        | 0xC0..=0x24F                  // Latin-1 Supplement letters, Latin Extended-A/B
        | 0x1E00..=0x1EFF)              // Latin Extended Additional
        && c.is_alphabetic()
}

/// Values that mean "nothing": dropped like empty ones.
const PLACEHOLDERS: &[&str] = &[
    "none", "null", "n/a", "na", "unknown", "other", "others", "nil", "无", "未知", "暂无", "没有",
    "其他",
];

/// Whether a normalized value carries no information (empty, punctuation only, a placeholder).
pub fn is_near_empty(normalized: &str) -> bool {
    !normalized.chars().any(char::is_alphanumeric) || PLACEHOLDERS.contains(&normalized)
}

/// Why candidates were dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Key not among the category's dimensions.
    pub off_handbook: u32,
    /// Empty, punctuation-only or placeholder value.
    pub empty: u32,
    /// Same (dimension, value) as an earlier tag.
    pub duplicate: u32,
    /// Longer than `max_tag_chars`.
    pub too_long: u32,
    /// Over the per-dimension or per-note count.
    pub over_limit: u32,
}

impl Dropped {
    /// All drops together.
    pub fn total(&self) -> u32 {
        self.off_handbook + self.empty + self.duplicate + self.too_long + self.over_limit
    }
}

/// Tags kept from one output, and what was dropped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    /// Kept tags, in output order.
    pub tags: Vec<Tag>,
    /// Dropped candidates by reason.
    pub dropped: Dropped,
    /// Whether the output was one well-formed JSON object.
    pub well_formed: bool,
    /// Candidate (key, value) pairs found in the output, kept or not.
    pub candidates: u32,
    /// Candidates whose normalized value repeats an earlier candidate's (in any dimension): the
    /// redundancy the handbook is meant to prevent.
    pub redundant: u32,
}

/// Parses a model output into tags of `category`, applying `limits`.
pub fn parse_output(output: &str, category: &Category, limits: &Limits) -> Parsed {
    let well_formed = output
        .find('{')
        .map(|i| {
            let mut it = serde_json::Deserializer::from_str(&output[i..])
                .into_iter::<serde_json::Map<String, serde_json::Value>>();
            matches!(it.next(), Some(Ok(_)))
        })
        .unwrap_or(false);
    let mut parsed = Parsed {
        well_formed,
        ..Default::default()
    };
    let mut seen = HashSet::new();
    let mut seen_values = HashSet::new();
    let mut per_dim: std::collections::HashMap<String, usize> = Default::default();
    for (key, raw_value) in scan_pairs(output) {
        parsed.candidates += 1;
        if !seen_values.insert(normalize(&raw_value)) {
            parsed.redundant += 1;
        }
        let dim = normalize(&key).replace(' ', "_");
        if !category.has_dimension(&dim) {
            parsed.dropped.off_handbook += 1;
            continue;
        }
        let value = normalize(&raw_value);
        if is_near_empty(&value) {
            parsed.dropped.empty += 1;
            continue;
        }
        if value.chars().count() > limits.max_tag_chars {
            parsed.dropped.too_long += 1;
            continue;
        }
        if !seen.insert((dim.clone(), value.clone())) {
            parsed.dropped.duplicate += 1;
            continue;
        }
        let n = per_dim.entry(dim.clone()).or_default();
        if *n >= limits.max_tags_per_dimension || parsed.tags.len() >= limits.max_tags_per_note {
            parsed.dropped.over_limit += 1;
            continue;
        }
        *n += 1;
        parsed.tags.push(Tag {
            dimension: dim,
            value,
            score: 1.0,
        });
    }
    parsed
}

/// Scans text for `key: value` and `key: [v1, v2, ...]` pairs, JSON or nearly so: tolerates
/// truncation, missing or trailing commas, single quotes, bare words and nested noise. Returns
/// (key, value) pairs in order.
fn scan_pairs(text: &str) -> Vec<(String, String)> {
    let Some(start) = text.find('{') else {
        return Vec::new();
    };
    let chars: Vec<char> = text[start + 1..].chars().collect();
    let mut pairs = Vec::new();
    let mut i = 0;
    let mut key: Option<String> = None;
    // Whether the current token position is a value position (after ':' or inside a list).
    let mut after_colon = false;
    let mut in_list = false;
    let mut pending: Option<String> = None;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '“' | '”' => {
                let close = match c {
                    '“' => '”',
                    other => other,
                };
                let (s, next) = read_quoted(&chars, i + 1, close);
                i = next;
                if in_list || after_colon {
                    if let Some(k) = &key {
                        pairs.push((k.clone(), s));
                    }
                    after_colon = false;
                } else {
                    pending = Some(s);
                }
                continue;
            }
            ':' => {
                if let Some(p) = pending.take() {
                    key = Some(p);
                    after_colon = true;
                    in_list = false;
                }
            }
            '[' => {
                if after_colon {
                    in_list = true;
                    after_colon = false;
                }
            }
            ']' => {
                in_list = false;
                key = None;
            }
            '}' => {
                // End of the top-level object (nested objects only add noise keys).
                in_list = false;
                after_colon = false;
                key = None;
            }
            ',' | '\n' => {
                if !in_list {
                    after_colon = false;
                }
            }
            c if c.is_whitespace() => {}
            _ => {
                // A bare word: a value in value position, else the start of an unquoted key.
                let begin = i;
                while i < chars.len() && !matches!(chars[i], ',' | ']' | '}' | ':' | '\n' | '"') {
                    i += 1;
                }
                let word: String = chars[begin..i]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string();
                if in_list || after_colon {
                    if let Some(k) = &key {
                        pairs.push((k.clone(), word));
                    }
                    after_colon = false;
                } else {
                    pending = Some(word);
                }
                continue;
            }
        }
        i += 1;
    }
    pairs
}

/// Reads a quoted string starting after the opening quote; returns it and the index after the
/// closing quote (or the end, for a truncated string). Handles JSON escapes.
fn read_quoted(chars: &[char], mut i: usize, close: char) -> (String, usize) {
    let mut s = String::new();
    while i < chars.len() {
        let c = chars[i];
        if c == close || (close == '"' && c == '”') {
            return (s, i + 1);
        }
        if c == '\\' && i + 1 < chars.len() {
            i += 1;
            match chars[i] {
                'n' => s.push('\n'),
                't' => s.push('\t'),
                'u' if i + 4 < chars.len() => {
                    let hex: String = chars[i + 1..i + 5].iter().collect();
                    if let Some(ch) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                        s.push(ch);
                        i += 4;
                    }
                }
                other => s.push(other),
            }
        } else if c == '\n' {
            // A string never spans lines in this output: treat as truncated here.
            return (s, i);
        } else {
            s.push(c);
        }
        i += 1;
    }
    (s, i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handbook::Dimension;

    fn cat() -> Category {
        let dim = |k: &str| Dimension {
            key: k.into(),
            name: k.into(),
            description: "d".into(),
            examples: vec![],
        };
        Category {
            key: "sneakers".into(),
            name: "Sneakers".into(),
            description: String::new(),
            aliases: vec![],
            dimensions: vec![dim("brand"), dim("colorway"), dim("scene")],
        }
    }

    #[test]
    fn normalizes_width_case_and_space() {
        assert_eq!(normalize("ＡＩＲ　 Jordan "), "air jordan");
        assert_eq!(normalize("  Nike\tDunk\n Low "), "nike dunk low");
        assert_eq!(normalize("熊猫配色"), "熊猫配色");
        assert_eq!(normalize("ÉCOLE"), "école");
        assert_eq!(normalize("ΑΘΗΝΑ"), "ΑΘΗΝΑ", "only Latin letters fold");
        assert_eq!(normalize("①"), "1");
    }

    #[test]
    fn parses_valid_json() {
        let out = r#"{"brand": ["Nike", "ＮＩＫＥ"], "colorway": ["Chicago"], "price": ["$100"], "scene": []}"#;
        let p = parse_output(out, &cat(), &Limits::default());
        assert!(p.well_formed);
        let got: Vec<_> = p
            .tags
            .iter()
            .map(|t| format!("{}:{}", t.dimension, t.value))
            .collect();
        assert_eq!(got, ["brand:nike", "colorway:chicago"]);
        assert_eq!(p.dropped.duplicate, 1);
        assert_eq!(p.dropped.off_handbook, 1);
        assert_eq!((p.candidates, p.redundant), (4, 1));
    }

    #[test]
    fn keeps_what_is_valid_in_broken_output() {
        let out =
            "{\"brand\": [\"Nike\" \"Adidas\",], 'colorway': 'bred', scene: [basketball, \"ca";
        let p = parse_output(out, &cat(), &Limits::default());
        assert!(!p.well_formed);
        let got: Vec<_> = p
            .tags
            .iter()
            .map(|t| format!("{}:{}", t.dimension, t.value))
            .collect();
        assert_eq!(
            got,
            [
                "brand:nike",
                "brand:adidas",
                "colorway:bred",
                "scene:basketball",
                "scene:ca"
            ]
        );
    }

    #[test]
    fn applies_limits_and_drops_noise() {
        let limits = Limits {
            max_tags_per_dimension: 2,
            max_tag_chars: 10,
            ..Limits::default()
        };
        let out = r#"{"brand": ["a", "b", "c", "n/a", "...", "waytoolongvalue"]}"#;
        let p = parse_output(out, &cat(), &limits);
        assert_eq!(p.tags.len(), 2);
        assert_eq!(p.dropped.over_limit, 1);
        assert_eq!(p.dropped.empty, 2);
        assert_eq!(p.dropped.too_long, 1);
        assert_eq!(p.dropped.total(), 4);
        assert!(parse_output("no json here", &cat(), &limits)
            .tags
            .is_empty());
    }
}

/// A tag value seen while the output was generated, with its confidence.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredValue {
    /// The key the value belongs to, as written.
    pub key: String,
    /// The value, as written.
    pub value: String,
    /// exp(mean log-probability of the tokens that wrote the value), in (0, 1].
    pub score: f32,
}

/// Follows JSON-like output byte by byte as it is generated and records, for every string value
/// inside a list (or right after a key), the log-probabilities of the tokens that wrote it. Works on
/// well-formed output exactly and on broken output as well as it can.
#[derive(Debug, Default, Clone)]
pub struct ValueTracker {
    in_list: bool,
    in_string: bool,
    escaped: bool,
    string_is_value: bool,
    after_colon: bool,
    buf: Vec<u8>,
    key: String,
    lps: Vec<f32>,
    values: Vec<ScoredValue>,
}

impl ValueTracker {
    /// Feeds the bytes of one token; `logprob` is its log-probability (`None` for text that was
    /// given, not generated, such as the assistant prefix).
    pub fn push(&mut self, bytes: &[u8], logprob: Option<f32>) {
        let mut counted = false;
        for &b in bytes {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    self.buf.push(b);
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.close_string();
                    continue;
                } else {
                    self.buf.push(b);
                }
                if self.string_is_value && !counted {
                    if let Some(lp) = logprob {
                        self.lps.push(lp);
                    }
                    counted = true;
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    counted = false;
                    self.string_is_value = self.in_list || self.after_colon;
                    self.buf.clear();
                    self.lps.clear();
                }
                b':' => self.after_colon = true,
                b'[' => {
                    self.in_list = true;
                    self.after_colon = false;
                }
                b']' => self.in_list = false,
                b',' | b'}' | b'{' => self.after_colon = false,
                _ => {}
            }
        }
    }

    fn close_string(&mut self) {
        self.in_string = false;
        let s = String::from_utf8_lossy(&self.buf).into_owned();
        if self.string_is_value {
            let score = if self.lps.is_empty() {
                1.0
            } else {
                (self.lps.iter().sum::<f32>() / self.lps.len() as f32).exp()
            };
            self.values.push(ScoredValue {
                key: self.key.clone(),
                value: s,
                score,
            });
            self.after_colon = false;
        } else {
            self.key = s;
        }
    }

    /// Whether the output is inside a value string now.
    pub fn in_value(&self) -> bool {
        self.in_string && self.string_is_value
    }

    /// The bytes of the value being written (meaningful when [`Self::in_value`]).
    pub fn current_value(&self) -> &[u8] {
        &self.buf
    }

    /// Values completed so far.
    pub fn values(&self) -> &[ScoredValue] {
        &self.values
    }
}

/// Sets each tag's score from the generation's scored values (matched by dimension and normalized
/// value; the first match wins). Tags with no match keep their score.
pub fn apply_scores(tags: &mut [Tag], scored: &[ScoredValue]) {
    for t in tags.iter_mut() {
        if let Some(s) = scored.iter().find(|s| {
            normalize(&s.key).replace(' ', "_") == t.dimension && normalize(&s.value) == t.value
        }) {
            t.score = s.score;
        }
    }
}

#[cfg(test)]
mod tracker_tests {
    use super::*;

    #[test]
    fn tracks_values_and_scores_across_token_boundaries() {
        let mut t = ValueTracker::default();
        t.push(b"{\"", None);
        for (tok, lp) in [
            ("brand", -0.1f32),
            ("\": [\"", -0.2),
            ("Ni", -1.0),
            ("ke", -3.0),
            ("\", \"", -0.1),
            ("Adi", -0.5),
            ("das\"]", -0.5),
            (", \"scene\": [\"gym\"]}", -2.0),
        ] {
            t.push(tok.as_bytes(), Some(lp));
            if tok == "ke" {
                assert!(t.in_value());
                assert_eq!(t.current_value(), b"Nike");
            }
        }
        let v = t.values();
        assert_eq!(v.len(), 3);
        assert_eq!((v[0].key.as_str(), v[0].value.as_str()), ("brand", "Nike"));
        assert!((v[0].score - (-2.0f32).exp()).abs() < 1e-6);
        assert!((v[1].score - (-0.5f32).exp()).abs() < 1e-6);
        assert_eq!((v[2].key.as_str(), v[2].value.as_str()), ("scene", "gym"));
        let mut tags = vec![Tag {
            dimension: "brand".into(),
            value: "adidas".into(),
            score: 1.0,
        }];
        apply_scores(&mut tags, v);
        assert!((tags[0].score - (-0.5f32).exp()).abs() < 1e-6);
    }
}
