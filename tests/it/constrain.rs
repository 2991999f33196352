//! The answer grammar, compiled by llguidance over the real SmolLM2 tokenizer: it admits exactly
//! the answers the handbook and the limits allow. Random walks through the constraint (random
//! logits, so every allowed path is fair game) must always end in an answer that parses, names
//! only the category's dimensions and respects every limit; forced strings that break a rule must
//! be refused.

use std::sync::Arc;

use tagllm::{
    domain::Limits, model::values::ValueTracker, model::Requantize, model::TextModel,
    tagging::grammar::tag_grammar, tagging::handbook::Handbook, tagging::tags::parse_output,
};

use crate::common::{model_path, root};

struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[test]
fn every_constrained_answer_is_valid_and_within_limits() {
    let mut model = TextModel::load(&model_path(), Requantize::Q8_0).unwrap();
    let vocab = model.tokenizer().get_vocab_size(true);
    let handbook = Handbook::load(&root().join("models/handbook.toml")).unwrap();
    let limits = Limits {
        max_tags_per_dimension: 2,
        max_tags_per_note: 5,
        max_tag_chars: 12,
        ..Limits::default()
    };
    let max_new = 96;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut walks = 0;
    // `{}` (no tag) is a valid answer; random walks take it now and then, not always.
    let mut empty = 0;
    for cat in std::iter::once(&handbook.fallback).chain(&handbook.categories) {
        let grammar: Arc<str> = tag_grammar(cat, &limits).into();
        for _ in 0..12 {
            let (mut c, _) = model.constrainer().start(&grammar).unwrap();
            let tok_env = model.constrainer().tok_env().clone();
            let mut tracker = ValueTracker::default();
            let mut out = Vec::new();
            let mut logits = vec![0f32; vocab];
            while out.len() < max_new {
                logits.iter_mut().for_each(|l| *l = rng.next_f32());
                let Some(t) = c.choose(&logits, &tracker, max_new - out.len()).unwrap() else {
                    break;
                };
                tracker.push(tok_env.tok_trie().token(t), Some(0.0));
                c.consume(t, &tracker).unwrap();
                out.push(t);
            }
            let text = String::from_utf8(tok_env.tok_trie().decode_raw(&out)).unwrap();
            let p = parse_output(&text, cat, &limits);
            assert!(p.well_formed, "{} walk: {text:?}", cat.key);
            assert_eq!(p.dropped.off_handbook, 0, "{text}");
            assert_eq!(p.dropped.over_limit, 0, "{text}");
            let v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&text).unwrap();
            empty += v.is_empty() as usize;
            let mut total = 0;
            for (k, vals) in &v {
                assert!(cat.has_dimension(k), "{k} in {text}");
                let vals = vals.as_array().unwrap();
                assert!(!vals.is_empty() && vals.len() <= 2, "{text}");
                for s in vals {
                    let s = s.as_str().unwrap();
                    let n = s.chars().count();
                    assert!((1..=12).contains(&n), "{s:?} in {text}");
                    assert_eq!(s.trim(), s, "{text}");
                }
                total += vals.len();
            }
            assert!(total <= 5, "{text}");
            walks += 1;
        }
    }
    assert_eq!(walks, 12 * (handbook.categories.len() + 1));
    assert!(empty < walks, "every walk answered {{}}");
}

#[test]
fn grammar_refuses_what_the_handbook_or_limits_forbid() {
    let mut model = TextModel::load(&model_path(), Requantize::Q8_0).unwrap();
    let handbook = Handbook::load(&root().join("models/handbook.toml")).unwrap();
    let limits = Limits {
        max_tags_per_dimension: 2,
        max_tags_per_note: 3,
        max_tag_chars: 10,
        ..Limits::default()
    };
    let grammar: Arc<str> = tag_grammar(handbook.resolve("sneakers"), &limits).into();
    let mut accepts = |text: &str| {
        let ids = model
            .tokenizer()
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        let (c, _) = model.constrainer().start(&grammar).unwrap();
        c.accepts(&ids)
    };
    for ok in [
        r#"{"brand": ["Nike"]}"#,
        r#"{"brand": ["Nike", "李宁"], "scene": ["通勤"]}"#,
        r#"{"colorway": ["熊猫配色"]}"#,
        r#"{"brand": ["abcdefghij"]}"#,
        r#"{}"#, // no tag at all: a note that supports none
    ] {
        assert!(accepts(ok), "should accept {ok}");
    }
    for bad in [
        r#"{"price": ["$0"]}"#,                          // key outside the handbook
        r#"{"admin": ["true"]}"#,                        // key outside the handbook
        r#"{"brand": ["abcdefghijk"]}"#,                 // 11 characters > 10
        r#"{"brand": ["a", "b", "c"]}"#,                 // 3 in a dimension > 2
        r#"{"brand": ["a", "b"], "scene": ["c", "d"]}"#, // 4 in all > 3
        r#"{"brand": []}"#,                              // empty list
        r#"{"brand": [""]}"#,                            // empty value
        r#"{"brand": [" Nike"]}"#,                       // leading space
        r#"{"scene": ["a"], "brand": ["b"]}"#,           // out of handbook order
        r#"{"brand": ["a"], "brand": ["b"]}"#,           // repeated key
        r#"{"brand": ["a\"b"]}"#,                        // escapes
        r#"{"brand": ["Nike"]} and more"#,               // trailing text
    ] {
        assert!(!accepts(bad), "should refuse {bad}");
    }
}
