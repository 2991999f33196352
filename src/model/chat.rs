//! The model's chat template (Jinja, from the checkpoint), rendered with minijinja the way Hugging
//! Face renders it: `trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`.

use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
    /// Images shown before the text (multimodal models). With images, the template sees the
    /// content as a list, `[{"type": "image"}, ..., {"type": "text", "text": content}]`, the shape
    /// Hugging Face chat templates of vision-language models expect.
    pub images: usize,
    /// Leading bytes of `content` that other prompts share (the handbook guidance before the
    /// note), for the prefix cache; not rendered differently. 0 for none.
    pub shared_head: usize,
}

impl Message {
    /// A text message with `role` and `content`.
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.to_string(),
            content: content.into(),
            images: 0,
            shared_head: 0,
        }
    }

    /// A message that shows `images` images, then `content`.
    pub fn with_images(role: &str, content: impl Into<String>, images: usize) -> Message {
        Message {
            images,
            ..Message::new(role, content)
        }
    }

    /// This message with its first `bytes` bytes of content marked as shared with other prompts
    /// (cut to a character boundary within the content).
    pub fn with_shared_head(mut self, bytes: usize) -> Message {
        let mut n = bytes.min(self.content.len());
        while !self.content.is_char_boundary(n) {
            n -= 1;
        }
        self.shared_head = n;
        self
    }
}

impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("role", &self.role)?;
        if self.images == 0 {
            m.serialize_entry("content", &self.content)?;
        } else {
            let mut parts: Vec<serde_json::Value> = (0..self.images)
                .map(|_| serde_json::json!({"type": "image"}))
                .collect();
            parts.push(serde_json::json!({"type": "text", "text": self.content}));
            m.serialize_entry("content", &parts)?;
        }
        m.end()
    }
}

/// A Qwen3-VL style ChatML template with image markup, for vision-language checkpoints that carry
/// no template of their own.
pub const CHATML_VL: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// ChatML, for checkpoints that carry no template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

/// A template that does not compile or render.
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the token texts templates may reference.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TemplateError(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// Renders the conversation, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| TemplateError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_like_hf() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let s = t
            .render(
                &[Message::new("system", "S"), Message::new("user", "U")],
                true,
            )
            .unwrap();
        assert_eq!(s, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn images_render_as_content_parts() {
        let t = ChatTemplate::new(CHATML_VL, "", "<|im_end|>").unwrap();
        let s = t
            .render(&[Message::with_images("user", "U", 2)], true)
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>U<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% for m in messages %}{{ m['content'].strip() }}{% endfor %}{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  hi ")], false).unwrap(),
            "hi"
        );
        let err = t
            .render(
                &[Message::new("user", "a"), Message::new("user", "b")],
                false,
            )
            .unwrap_err();
        assert!(err.to_string().contains("one only"));
    }
}
