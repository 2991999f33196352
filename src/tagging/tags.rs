//! Model output -> tags. The parser is lenient (a small model often breaks JSON: truncation, missing
//! commas, bare words), keeps what is valid, and counts what it dropped. Values are normalized so
//! that `ＡＩＲ  Jordan` and `air jordan` are one tag.

use std::collections::HashSet;

use crate::{
    domain::{normalize, Limits, Tag},
    model::values::ScoredValue,
    tagging::handbook::Category,
};

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
    use crate::tagging::handbook::Dimension;

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
mod score_tests {
    use super::*;

    #[test]
    fn scores_match_by_normalized_dimension_and_value() {
        let scored = |key: &str, value: &str, score: f32| ScoredValue {
            key: key.into(),
            value: value.into(),
            score,
        };
        let mut tags = vec![
            Tag {
                dimension: "brand".into(),
                value: "adidas".into(),
                score: 1.0,
            },
            Tag {
                dimension: "use_case".into(),
                value: "gym".into(),
                score: 1.0,
            },
        ];
        apply_scores(
            &mut tags,
            &[
                scored("brand", "Nike", 0.1),
                scored("Brand", "ＡＤＩＤＡＳ", 0.5),
                scored("brand", "adidas", 0.9),
                scored("Use Case", " Gym ", 0.7),
            ],
        );
        assert_eq!(tags[0].score, 0.5, "the first match wins");
        assert_eq!(tags[1].score, 0.7);
    }
}
