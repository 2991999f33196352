//! Tag value normalization: the one definition of "the same value", used by the handbook, the
//! parser, the decoder's no-repeat rule and the feature ids.

use unicode_normalization::UnicodeNormalization;

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
