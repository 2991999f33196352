//! Canonical tag values: one thing, one tag. A synonym file lists, one group per line, a
//! canonical spelling and its other spellings (`通勤 | commute`, `Nike | 耐克`); a dimension's
//! values that appear in its file are replaced by their line's canonical spelling. The feature
//! schema applies it before ids are computed (`features`), distillation to the teacher's training
//! targets, and `tagllm eval` to both sides of a comparison.

use std::collections::HashMap;

use super::{normalize, Tag};

/// Synonym groups per dimension.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Canonical {
    /// Dimension -> normalized spelling -> the canonical spelling.
    by_dimension: HashMap<String, HashMap<String, Spelling>>,
}

/// A group's canonical spelling, as written in its file and normalized (what tag values are).
#[derive(Debug, Clone, PartialEq)]
struct Spelling {
    written: String,
    normalized: String,
}

/// Why a synonym file was refused: the line (1-based) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct SynonymError {
    /// The line, 1-based.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Parses a synonym file: `#` comments and blank lines are skipped; every other line is one group,
/// its spellings separated by `|`, the first canonical. A spelling may appear once in the file
/// (after normalization). Returns normalized spelling -> canonical spelling, every spelling of a
/// group included (its canonical one too).
pub fn parse_synonyms(text: &str) -> Result<HashMap<String, String>, SynonymError> {
    let mut map = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let err = |reason: String| SynonymError {
            line: i + 1,
            reason,
        };
        let spellings: Vec<&str> = t.split('|').map(str::trim).collect();
        let canonical = spellings[0];
        for s in &spellings {
            let n = normalize(s);
            if n.is_empty() {
                return Err(err(format!("{t:?} has an empty spelling")));
            }
            if map.insert(n.clone(), canonical.to_string()).is_some() {
                return Err(err(format!(
                    "{s:?} normalizes to {n:?}, which an earlier line already has"
                )));
            }
        }
    }
    Ok(map)
}

impl Canonical {
    /// No synonyms: every value is its own canonical value.
    pub fn none() -> Canonical {
        Canonical::default()
    }

    /// Adds `dimension`'s synonym groups (from [`parse_synonyms`]).
    pub fn insert(&mut self, dimension: &str, groups: HashMap<String, String>) {
        let groups = groups
            .into_iter()
            .map(|(key, written)| {
                let normalized = normalize(&written);
                (
                    key,
                    Spelling {
                        written,
                        normalized,
                    },
                )
            })
            .collect();
        self.by_dimension.insert(dimension.to_string(), groups);
    }

    /// Dimensions with synonym groups.
    pub fn dimensions(&self) -> impl Iterator<Item = &str> {
        self.by_dimension.keys().map(String::as_str)
    }

    /// The canonical spelling of `value` in `dimension`, or `value` itself when no group has it.
    pub fn spelling<'a>(&'a self, dimension: &str, value: &'a str) -> &'a str {
        self.by_dimension
            .get(dimension)
            .and_then(|m| m.get(&normalize(value)))
            .map_or(value, |s| s.written.as_str())
    }

    /// The canonical value (normalized) of a tag value of `dimension`, which is normalized as tag
    /// values are: one lookup, no allocation (the feature ids' path).
    pub fn value<'a>(&'a self, dimension: &str, normalized: &'a str) -> &'a str {
        self.by_dimension
            .get(dimension)
            .and_then(|m| m.get(normalized))
            .map_or(normalized, |s| s.normalized.as_str())
    }

    /// Whether `dimension` has synonym groups.
    pub fn covers(&self, dimension: &str) -> bool {
        self.by_dimension.contains_key(dimension)
    }

    /// `tags` with their values in canonical spelling (normalized, as tag values are), in order;
    /// a tag that becomes the same as an earlier one of its dimension is left out.
    pub fn tags(&self, tags: &[Tag]) -> Vec<Tag> {
        let mut seen = std::collections::HashSet::new();
        tags.iter()
            .map(|t| Tag {
                value: self.value(&t.dimension, &t.value).to_string(),
                ..t.clone()
            })
            .filter(|t| seen.insert((t.dimension.clone(), t.value.clone())))
            .collect()
    }

    /// `values` of `dimension` in their canonical spellings, in order, with repeats (after
    /// normalization: two synonyms become one value) left out.
    pub fn canonicalize(&self, dimension: &str, values: &[String]) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        values
            .iter()
            .map(|v| self.spelling(dimension, v).to_string())
            .filter(|v| seen.insert(normalize(v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_map_to_their_first_spelling() {
        let groups =
            parse_synonyms("# scenes\n\n通勤 | commute | Commuting\nOffice | 上班\n").unwrap();
        let mut c = Canonical::none();
        c.insert("scene", groups);
        assert_eq!(c.spelling("scene", "commute"), "通勤");
        assert_eq!(
            c.spelling("scene", " COMMUTING "),
            "通勤",
            "normalized lookup"
        );
        assert_eq!(
            c.spelling("scene", "上班"),
            "Office",
            "canonical as written"
        );
        assert_eq!(c.spelling("scene", "通勤"), "通勤");
        assert_eq!(
            c.spelling("scene", "马拉松"),
            "马拉松",
            "not listed: itself"
        );
        assert_eq!(c.spelling("style", "commute"), "commute", "other dimension");
        let v = ["commute".to_string(), "通勤".into(), "上班".into()];
        assert_eq!(c.canonicalize("scene", &v), ["通勤", "Office"]);
        assert!(c.covers("scene") && !c.covers("style"));
        let tag = |d: &str, v: &str| Tag {
            dimension: d.into(),
            value: v.into(),
            score: 1.0,
        };
        let tags = [
            tag("scene", "commute"),
            tag("scene", "通勤"),
            tag("style", "office"),
        ];
        assert_eq!(
            c.tags(&tags),
            [tag("scene", "通勤"), tag("style", "office")]
        );
        let tags = [tag("scene", "上班")];
        assert_eq!(
            c.tags(&tags),
            [tag("scene", "office")],
            "normalized like tag values"
        );
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = parse_synonyms("a | b\nc | B\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("earlier line"), "{e}");
        assert_eq!(parse_synonyms("a | | b").unwrap_err().line, 1);
    }
}
