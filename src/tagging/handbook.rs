//! The User Interest Handbook: per note category, the dimensions users care about, each with a
//! description and examples. It guides generation (the prompt is rendered from the category's
//! entry) and bounds it (only the entry's dimension keys become tags). Format: `models/HANDBOOK.md`.

use std::{collections::HashMap, path::Path};

use serde::Deserialize;

use crate::domain::{is_valid_key, normalize};

/// A handbook that loaded and validated.
#[derive(Debug, Clone)]
pub struct Handbook {
    /// Bumped on any change; part of the idempotency key.
    pub version: String,
    /// Entry for categories not listed.
    pub fallback: Category,
    /// Listed categories, in file order.
    pub categories: Vec<Category>,
    /// Category key or alias -> index into `categories`.
    index: HashMap<String, usize>,
}

/// One category's entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    /// Key callers send in `note.category`.
    pub key: String,
    /// Display name.
    pub name: String,
    /// What notes of this category are about.
    pub description: String,
    /// Other keys that resolve to this entry.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The dimensions of user interest, in prompt order.
    #[serde(rename = "dimension", default)]
    pub dimensions: Vec<Dimension>,
}

/// One dimension of user interest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimension {
    /// Tag dimension key, `^[a-z][a-z0-9_]{0,31}$`.
    pub key: String,
    /// Display name.
    pub name: String,
    /// What this dimension captures.
    pub description: String,
    /// Example values (mixed languages welcome).
    pub examples: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: String,
    fallback: Category,
    #[serde(rename = "category", default)]
    categories: Vec<Category>,
}

/// Why a handbook was refused; every message names the file and the place in it.
#[derive(Debug, thiserror::Error)]
pub enum HandbookError {
    /// Could not read the file.
    #[error("handbook {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// TOML syntax or shape (the message carries line and column).
    #[error("handbook {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A rule of the format is broken.
    #[error("handbook {path}: {place}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// e.g. `category[2] "beauty" dimension[1]`.
        place: String,
        /// What rule is broken.
        reason: String,
    },
}

/// Fewest examples per dimension.
pub const MIN_EXAMPLES: usize = 3;
/// Most examples per dimension.
pub const MAX_EXAMPLES: usize = 8;
/// Longest example (characters).
pub const MAX_EXAMPLE_CHARS: usize = 24;
/// Longest description (characters).
pub const MAX_DESCRIPTION_CHARS: usize = 200;

impl Handbook {
    /// Loads and validates a handbook file.
    pub fn load(path: &Path) -> Result<Handbook, HandbookError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| HandbookError::Io {
            path: p.clone(),
            source,
        })?;
        Handbook::parse(&text, &p)
    }

    /// Parses and validates handbook text; `path` only labels errors.
    pub fn parse(text: &str, path: &str) -> Result<Handbook, HandbookError> {
        let file: File = toml::from_str(text).map_err(|e| HandbookError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        let invalid = |place: String, reason: String| HandbookError::Invalid {
            path: path.to_string(),
            place,
            reason,
        };
        if file.version.trim().is_empty() {
            return Err(invalid("version".into(), "must not be empty".into()));
        }
        validate_category(&file.fallback, "fallback".to_string())
            .map_err(|(pl, r)| invalid(pl, r))?;
        if !file.fallback.aliases.is_empty() {
            return Err(invalid(
                "fallback".into(),
                "takes no aliases: it already answers every unknown category".into(),
            ));
        }
        let fallback_key = normalize(&file.fallback.key);
        let mut index = HashMap::new();
        for (i, cat) in file.categories.iter().enumerate() {
            let place = format!("category[{i}] {:?}", cat.key);
            validate_category(cat, place.clone()).map_err(|(pl, r)| invalid(pl, r))?;
            if cat.key == file.fallback.key {
                return Err(invalid(
                    place,
                    "key collides with the fallback's key".into(),
                ));
            }
            for name in std::iter::once(&cat.key).chain(cat.aliases.iter()) {
                let norm = normalize(name);
                if norm.is_empty() {
                    return Err(invalid(place, format!("alias {name:?} is empty")));
                }
                if norm == fallback_key {
                    return Err(invalid(
                        place,
                        format!("alias {name:?} is the fallback's key"),
                    ));
                }
                if let Some(prev) = index.insert(norm, i) {
                    return Err(invalid(
                        place,
                        format!(
                            "key or alias {name:?} is already used by category[{prev}] {:?}",
                            file.categories[prev].key
                        ),
                    ));
                }
            }
        }
        Ok(Handbook {
            version: file.version,
            fallback: file.fallback,
            categories: file.categories,
            index,
        })
    }

    /// The entry for a category key or alias (compared after [`normalize`]); `None` means the
    /// fallback applies.
    pub fn lookup(&self, key: &str) -> Option<&Category> {
        self.index
            .get(&normalize(key))
            .map(|&i| &self.categories[i])
    }

    /// The entry for a note's category: its own, or the fallback for unknown categories.
    pub fn resolve(&self, key: &str) -> &Category {
        self.lookup(key).unwrap_or(&self.fallback)
    }
}

fn validate_category(cat: &Category, place: String) -> Result<(), (String, String)> {
    if !is_valid_key(&cat.key) {
        return Err((
            place,
            format!("key {:?} must match ^[a-z][a-z0-9_]{{0,31}}$", cat.key),
        ));
    }
    if cat.name.trim().is_empty() {
        return Err((place, "name must not be empty".into()));
    }
    if cat.description.trim().is_empty() {
        return Err((place, "description must not be empty".into()));
    }
    if cat.description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err((
            place,
            format!("description is over {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    if cat.dimensions.is_empty() {
        return Err((place, "needs at least one [[...dimension]]".into()));
    }
    let mut seen = HashMap::new();
    for (j, d) in cat.dimensions.iter().enumerate() {
        let dplace = format!("{place} dimension[{j}] {:?}", d.key);
        if !is_valid_key(&d.key) {
            return Err((
                dplace,
                format!("key {:?} must match ^[a-z][a-z0-9_]{{0,31}}$", d.key),
            ));
        }
        if let Some(prev) = seen.insert(d.key.as_str(), j) {
            return Err((dplace, format!("key repeats dimension[{prev}]")));
        }
        if d.description.trim().is_empty() {
            return Err((dplace, "description must not be empty".into()));
        }
        if d.description.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err((
                dplace,
                format!("description is over {MAX_DESCRIPTION_CHARS} characters"),
            ));
        }
        if d.name.trim().is_empty() {
            return Err((dplace, "name must not be empty".into()));
        }
        if !(MIN_EXAMPLES..=MAX_EXAMPLES).contains(&d.examples.len()) {
            return Err((
                dplace,
                format!(
                    "has {} examples; {MIN_EXAMPLES}..={MAX_EXAMPLES} are needed",
                    d.examples.len()
                ),
            ));
        }
        let mut seen_examples = std::collections::HashSet::new();
        for ex in &d.examples {
            if !seen_examples.insert(normalize(ex)) {
                return Err((dplace, format!("example {ex:?} repeats an earlier one")));
            }
            let n = ex.chars().count();
            if n == 0 || n > MAX_EXAMPLE_CHARS || ex.trim().is_empty() {
                return Err((
                    dplace,
                    format!("example {ex:?} must be 1..={MAX_EXAMPLE_CHARS} characters"),
                ));
            }
        }
    }
    Ok(())
}

impl Category {
    /// Whether `key` is one of this entry's dimensions.
    pub fn has_dimension(&self, key: &str) -> bool {
        self.dimensions.iter().any(|d| d.key == key)
    }

    /// The guidance block of the prompt: the category and its dimensions with descriptions and
    /// examples, one line each.
    pub fn guidance(&self) -> String {
        let mut s = format!("Category: {} ({})", self.name, self.key);
        if !self.description.is_empty() {
            s.push_str(&format!(". {}", self.description.trim()));
        }
        s.push_str("\nDimensions of user interest:\n");
        for d in &self.dimensions {
            s.push_str(&format!("- {}: {}", d.key, d.description.trim()));
            if !d.examples.is_empty() {
                s.push_str(&format!(" Examples: {}.", d.examples.join(", ")));
            }
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
version = "t1"
[fallback]
key = "general"
name = "General"
description = "Anything else."
[[fallback.dimension]]
key = "topic"
name = "Topic"
description = "What it is about."
examples = ["a", "b", "c"]
[[category]]
key = "sneakers"
name = "Sneakers"
description = "Shoes."
aliases = ["球鞋", "ＳＨＯＥＳ"]
[[category.dimension]]
key = "brand"
name = "Brand"
description = "The brand."
examples = ["Nike", "李宁", "Adidas"]
"#;

    #[test]
    fn resolves_keys_aliases_and_fallback() {
        let h = Handbook::parse(OK, "t").unwrap();
        assert_eq!(h.resolve("sneakers").key, "sneakers");
        assert_eq!(h.resolve("SNEAKERS").key, "sneakers");
        assert_eq!(h.resolve("球鞋").key, "sneakers");
        assert_eq!(h.resolve(" shoes ").key, "sneakers");
        assert_eq!(h.resolve("pets").key, "general");
        assert!(h.lookup("pets").is_none());
        let g = h.resolve("sneakers").guidance();
        assert!(
            g.contains("- brand: The brand. Examples: Nike, 李宁, Adidas."),
            "{g}"
        );
    }

    #[test]
    fn errors_point_at_the_problem() {
        let bad_key = OK.replace("key = \"brand\"", "key = \"Brand Name\"");
        let e = Handbook::parse(&bad_key, "hb.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hb.toml") && e.contains("category[0]") && e.contains("dimension[0]"),
            "{e}"
        );
        let alias_clash = OK.replace("\"ＳＨＯＥＳ\"", "\"Sneakers\"");
        let e = Handbook::parse(&alias_clash, "hb.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("already used"), "{e}");
        let dup = OK.replace(
            "[\"Nike\", \"李宁\", \"Adidas\"]",
            "[\"Nike\", \"ＮＩＫＥ\", \"李宁\"]",
        );
        let e = Handbook::parse(&dup, "hb.toml").unwrap_err().to_string();
        assert!(e.contains("repeats"), "{e}");
        let fb = OK.replace("\"ＳＨＯＥＳ\"", "\"General\"");
        let e = Handbook::parse(&fb, "hb.toml").unwrap_err().to_string();
        assert!(e.contains("fallback"), "{e}");
        let syntax = OK.replace("version = \"t1\"", "version = ");
        let e = Handbook::parse(&syntax, "hb.toml").unwrap_err().to_string();
        assert!(e.contains("line"), "{e}");
        let few = OK.replace(
            "[\"Nike\", \"李宁\", \"Adidas\"]",
            "[\"Nike\", \"ＮＩＫＥ\", \"李宁\"]",
        );
        let e = Handbook::parse(&few, "hb.toml").unwrap_err().to_string();
        assert!(e.contains("repeats"), "{e}");
        let fb = OK.replace(
            "aliases = [\"球鞋\", \"ＳＨＯＥＳ\"]",
            "aliases = [\"General\"]",
        );
        let e = Handbook::parse(&fb, "hb.toml").unwrap_err().to_string();
        assert!(e.contains("fallback"), "{e}");
        let unknown = OK.replace("name = \"Brand\"", "nme = \"Brand\"");
        let e = Handbook::parse(&unknown, "hb.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nme"), "{e}");
    }

    #[test]
    fn shipped_handbook_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/handbook.toml");
        let h = Handbook::load(&path).unwrap();
        assert!(h.categories.len() >= 6);
        for key in ["sneakers", "apparel", "beauty", "digital", "food", "travel"] {
            assert!(h.lookup(key).is_some(), "missing {key}");
        }
    }
}
