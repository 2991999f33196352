//! Tag values with their confidence, read while the answer is generated: the decoder knows each
//! token's log-probability, and this tracker knows which bytes of the JSON-like answer are values.

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

#[cfg(test)]
mod tests {
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
    }
}
