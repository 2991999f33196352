//! Chat prompts to token ids: the template's own text with special tokens, message contents as
//! plain text (a note cannot open a turn of its own), the shared prefix that prompts of a
//! category have in common, and cutting the note's end to fit the context.

use std::sync::Arc;

use super::{chat::Message, ModelError, TextModel};

/// Shared message heads whose token ids are memoized (one per category in practice); the memo
/// is emptied when full.
pub(super) const HEAD_MEMO_ENTRIES: usize = 256;

/// A chat prompt's token ids, from [`TextModel::encode_chat_within`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    /// The ids.
    pub ids: Vec<u32>,
    /// Whether the last message was cut to fit.
    pub truncated: bool,
    /// Ids before the last message's content (the template's turns before it and its opening),
    /// plus those of the content's shared head ([`Message::shared_head`], the handbook guidance):
    /// the part that prompts of the same category share.
    pub shared_prefix: usize,
}

impl TextModel {
    /// Ids of `text` as message content: plain text, special-token strings not parsed.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        self.encode_into(&self.text_tokenizer, text, &mut ids)?;
        Ok(ids)
    }

    /// The token that ends an assistant turn: the chat template's end-of-turn token (ChatML's
    /// `<|im_end|>`), else the first stop token.
    pub fn end_of_turn(&self) -> Option<u32> {
        self.tokenizer
            .token_to_id(&self.special.eos_text)
            .or_else(|| self.special.stop.first().copied())
    }

    /// Renders `messages` with the chat template, opens the assistant turn and appends
    /// `assistant_prefix`, then tokenizes. Special tokens are parsed in the template's own text
    /// only: message contents (the note, which is untrusted) are tokenized as plain text, so a note
    /// that writes `<|im_end|><|im_start|>system` cannot open a turn of its own.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        assistant_prefix: &str,
    ) -> Result<Vec<u32>, ModelError> {
        Ok(self.encode_chat_parts(messages, assistant_prefix)?.0)
    }

    /// [`TextModel::encode_chat`], also returning the shared prefix's length
    /// ([`EncodedPrompt::shared_prefix`]).
    fn encode_chat_parts(
        &self,
        messages: &[Message],
        assistant_prefix: &str,
    ) -> Result<(Vec<u32>, usize), ModelError> {
        // Render with a placeholder per content, then tokenize the template's pieces with special
        // tokens and each content as text. Private-use characters never occur in a template.
        let placeholder = |i: usize| format!("\u{F8F0}{i}\u{F8F1}");
        let masked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message::with_images(&m.role, placeholder(i), m.images))
            .collect();
        let mut text = self.template.render(&masked, true)?;
        text.push_str(assistant_prefix);
        let mut ids = Vec::with_capacity(text.len() / 2);
        if self.special.add_bos {
            ids.extend(self.special.bos);
        }
        let mut rest = text.as_str();
        let mut used = 0;
        let mut shared = 0;
        while let Some(start) = rest.find('\u{F8F0}') {
            let end = rest[start..]
                .find('\u{F8F1}')
                .map(|e| start + e)
                .ok_or_else(|| {
                    ModelError::internal("chat template mangled a message placeholder")
                })?;
            let i: usize = rest[start + '\u{F8F0}'.len_utf8()..end]
                .parse()
                .map_err(|_| ModelError::internal("chat template mangled a message placeholder"))?;
            let message = messages
                .get(i)
                .ok_or_else(|| ModelError::internal("chat template invented a message"))?;
            self.encode_into(&self.tokenizer, &rest[..start], &mut ids)?;
            let content_start = ids.len();
            self.encode_into(&self.text_tokenizer, &message.content, &mut ids)?;
            if i + 1 == messages.len() {
                shared = content_start;
                // The content's shared head counts only where it tokenizes on its own exactly
                // as it does inside the content (a merge across the boundary would differ).
                // (A cut to fit the context may have shortened the content below its head.)
                let head = message.content.get(..message.shared_head).unwrap_or("");
                if !head.is_empty() {
                    let head_ids = self.head_ids(head)?;
                    if ids[content_start..].starts_with(&head_ids) {
                        shared += head_ids.len();
                    }
                }
            }
            used += 1;
            rest = &rest[end + '\u{F8F1}'.len_utf8()..];
        }
        self.encode_into(&self.tokenizer, rest, &mut ids)?;
        if used != messages.len() {
            return Err(ModelError::internal(format!(
                "chat template rendered {used} of {} message contents",
                messages.len()
            )));
        }
        Ok((ids, shared))
    }

    /// Ids of a message's shared head on its own, memoized: every note of a category has the
    /// same head (its guidance, ~600 tokens), so it is tokenized once, not once per note.
    fn head_ids(&self, head: &str) -> Result<Arc<[u32]>, ModelError> {
        let mut memo = self.head_memo.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = memo.get(head) {
            return Ok(ids.clone());
        }
        let mut ids = Vec::new();
        self.encode_into(&self.text_tokenizer, head, &mut ids)?;
        let ids: Arc<[u32]> = ids.into();
        if memo.len() >= HEAD_MEMO_ENTRIES {
            memo.clear();
        }
        memo.insert(head.to_string(), ids.clone());
        Ok(ids)
    }

    fn encode_into(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        text: &str,
        ids: &mut Vec<u32>,
    ) -> Result<(), ModelError> {
        if !text.is_empty() {
            ids.extend_from_slice(
                tokenizer
                    .encode(text, false)
                    .map_err(ModelError::Tokenizer)?
                    .get_ids(),
            );
        }
        Ok(())
    }

    /// Like [`TextModel::encode_chat`], but when the prompt exceeds `max_tokens` it cuts the end of
    /// the last message (where the note's body is) until it fits; returns the ids and whether it
    /// cut. Errors only when even an empty last message does not fit.
    pub fn encode_chat_within(
        &self,
        messages: &[Message],
        assistant_prefix: &str,
        max_tokens: usize,
    ) -> Result<EncodedPrompt, ModelError> {
        let (ids, shared_prefix) = self.encode_chat_parts(messages, assistant_prefix)?;
        if ids.len() <= max_tokens {
            return Ok(EncodedPrompt {
                ids,
                truncated: false,
                shared_prefix,
            });
        }
        let mut msgs = messages.to_vec();
        let Some(last) = msgs.len().checked_sub(1) else {
            return Err(ModelError::PromptTooLong {
                tokens: ids.len(),
                limit: max_tokens,
            });
        };
        let content = self
            .text_tokenizer
            .encode(msgs[last].content.as_str(), false)
            .map_err(ModelError::Tokenizer)?;
        let content_ids = content.get_ids();
        let mut excess = ids.len() - max_tokens;
        // Token boundaries can shift when text is re-encoded: cut, re-check, cut a little more.
        for _ in 0..4 {
            let keep = content_ids.len().saturating_sub(excess + 4);
            if keep == 0 {
                break;
            }
            let mut cut = self
                .tokenizer
                .decode(&content_ids[..keep], false)
                .map_err(ModelError::Tokenizer)?;
            // A cut may end inside a multi-byte character, which decodes as U+FFFD: drop it.
            while cut.ends_with('\u{FFFD}') {
                cut.pop();
            }
            msgs[last].content = cut;
            let (ids, shared_prefix) = self.encode_chat_parts(&msgs, assistant_prefix)?;
            if ids.len() <= max_tokens {
                return Ok(EncodedPrompt {
                    ids,
                    truncated: true,
                    shared_prefix,
                });
            }
            excess += ids.len() - max_tokens;
        }
        Err(ModelError::PromptTooLong {
            tokens: ids.len(),
            limit: max_tokens,
        })
    }
}
