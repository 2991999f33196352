//! The answer's grammar, compiled from a category's handbook entry: a JSON object whose keys are
//! only that category's dimensions (in handbook order, each at most once), each a list of 1 to
//! `max_tags_per_dimension` strings of 1 to `max_tag_chars` characters, at most `max_tags_per_note`
//! in all, in one fixed layout:
//!
//! ```text
//! {"brand": ["Nike", "Air Jordan"], "scene": ["通勤"]}
//! ```
//!
//! or `{}`: a note that supports no tag (an emoji title, an empty body, an off-topic note) gets
//! none, rather than one the grammar would force the model to invent.
//!
//! The text is llguidance's Lark dialect. The total-count bound is what JSON Schema cannot say;
//! here it is a budget carried in the rule names (`r_D_B`: at dimension D with B tags left, nothing
//! emitted yet; `t_D_B`: the same after a first tag), so every accepted string has exactly one
//! derivation. Pure text generation: no model, no llguidance; `model::constrain` compiles it.

use std::fmt::Write;

use crate::{domain::Limits, tagging::handbook::Category};

/// Characters a tag value may not contain: the quote and backslash (so the value needs no JSON
/// escapes) and control characters.
const VALUE_CHAR: &str = r#"[^"\\\x00-\x1F\x7F]"#;
/// First and last character of a value: as [`VALUE_CHAR`], and not whitespace.
const VALUE_EDGE: &str = r#"[^"\\\x00-\x1F\x7F\s]"#;

/// The Lark grammar of a tag answer for `category` under `limits`.
pub fn tag_grammar(category: &Category, limits: &Limits) -> String {
    let n = category.dimensions.len();
    let k = limits.max_tags_per_dimension.max(1);
    let total = limits.max_tags_per_note.clamp(1, n * k);
    let len = limits.max_tag_chars.max(1);
    let mut g = String::new();
    let _ = writeln!(g, "// tags for category {:?}", category.key);
    let _ = writeln!(g, "start: \"{{}}\" | \"{{\" r_0_{total}");
    // r_d_b: the first tag is still to come, at dimension d or later.
    for d in 0..n {
        for b in 1..=total {
            let mut alts = Vec::new();
            for j in 1..=k.min(b) {
                alts.push(format!("p_{d}_{j} t_{}_{}", d + 1, b - j));
            }
            if d + 1 < n {
                alts.push(format!("r_{}_{b}", d + 1));
            }
            let _ = writeln!(g, "r_{d}_{b}: {}", alts.join(" | "));
        }
    }
    // t_d_b: after at least one tag; more may follow at dimension d or later, then "}".
    for d in 1..=n {
        for b in 0..total {
            if d == n || b == 0 {
                let _ = writeln!(g, "t_{d}_{b}: \"}}\"");
                continue;
            }
            let mut alts = Vec::new();
            for j in 1..=k.min(b) {
                alts.push(format!("\", \" p_{d}_{j} t_{}_{}", d + 1, b - j));
            }
            alts.push(format!("t_{}_{b}", d + 1));
            let _ = writeln!(g, "t_{d}_{b}: {}", alts.join(" | "));
        }
    }
    // p_d_j: dimension d with j values.
    for (d, dim) in category.dimensions.iter().enumerate() {
        for j in 1..=k {
            let _ = writeln!(g, "p_{d}_{j}: \"\\\"{}\\\": [\" values_{j} \"]\"", dim.key);
        }
    }
    for j in 1..=k {
        let vals = vec!["VALUE"; j].join(" \", \" ");
        let _ = writeln!(g, "values_{j}: {vals}");
    }
    let inner = if len >= 2 {
        format!(
            "({VALUE_EDGE}|{VALUE_EDGE}{VALUE_CHAR}{{0,{}}}{VALUE_EDGE})",
            len - 2
        )
    } else {
        VALUE_EDGE.to_string()
    };
    let _ = writeln!(g, "VALUE: /\"{inner}\"/");
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tagging::handbook::Dimension;

    #[test]
    fn grammar_names_only_the_category_dimensions() {
        let dim = |k: &str| Dimension {
            key: k.into(),
            name: k.into(),
            description: "d".into(),
            examples: vec![],
        };
        let cat = Category {
            key: "c".into(),
            name: "C".into(),
            description: "d".into(),
            aliases: vec![],
            dimensions: vec![dim("brand"), dim("scene")],
        };
        let limits = Limits {
            max_tags_per_dimension: 2,
            max_tags_per_note: 3,
            max_tag_chars: 10,
            ..Limits::default()
        };
        let g = tag_grammar(&cat, &limits);
        assert!(g.contains("start: \"{}\" | \"{\" r_0_3"), "{g}");
        assert!(g.contains(r#"p_0_2: "\"brand\": [" values_2 "]""#), "{g}");
        assert!(g.contains(r#"p_1_1: "\"scene\": [" values_1 "]""#), "{g}");
        assert_eq!(g.matches("\\\": [").count(), 4, "2 dimensions x 2 counts");
        assert!(g.contains("{0,8}"), "value length bound: {g}");
    }
}
