//! Chat templates: `chat_template` from tokenizer_config.json (or chat_template.jinja) rendered
//! with a real Jinja engine (minijinja, with Python's string methods from minijinja-contrib),
//! configured as transformers configures Jinja2 for `apply_chat_template`: trim_blocks,
//! lstrip_blocks, loop controls, `raise_exception`, and the special tokens as variables.

use crate::error::{Error, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

/// A model's chat template with the variables it is rendered with.
pub struct ChatTemplate {
    source: String,
    /// Where it came from, for error messages.
    origin: String,
    /// bos_token, eos_token, pad_token, unk_token: the text of each one the tokenizer config names.
    special: serde_json::Map<String, Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({}, {} bytes)", self.origin, self.source.len())
    }
}

impl ChatTemplate {
    /// The template in `dir`: chat_template.jinja if present (the newer transformers layout),
    /// else `chat_template` in tokenizer_config.json (a string, or a list of named templates,
    /// of which "default" is used). None when the checkpoint has none.
    pub fn load(dir: &Path) -> Result<Option<ChatTemplate>> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            serde_json::from_str::<Value>(&text).map_err(|source| Error::Json { path: config_path.clone(), source })?
        } else {
            Value::Null
        };
        let file = dir.join("chat_template.jinja");
        let (source, origin) = if file.is_file() {
            (std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?, file.display().to_string())
        } else {
            match config.get("chat_template") {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(s)) => (s.clone(), format!("{} (chat_template)", config_path.display())),
                Some(Value::Array(named)) => {
                    let default = named.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                    match default.and_then(|t| t.get("template")).and_then(Value::as_str) {
                        Some(s) => (s.to_string(), format!("{} (chat_template \"default\")", config_path.display())),
                        None => return Err(Error::Tokenizer(format!("{}: chat_template is a list without a \"default\" template", config_path.display()))),
                    }
                }
                Some(_) => return Err(Error::Tokenizer(format!("{}: chat_template is neither a string nor a list", config_path.display()))),
            }
        };
        Ok(Some(ChatTemplate::new(source, origin, &config)))
    }

    /// `tokenizer.chat_template` of a GGUF file, with its BOS and EOS tokens' text. None when
    /// the file has none.
    pub fn from_gguf(gguf: &crate::gguf::Gguf, origin: &Path) -> Result<Option<ChatTemplate>> {
        let Some(source) = crate::gguf::tokenizer::chat_template(gguf)? else { return Ok(None) };
        // The BOS and EOS tokens' text only: no tokenizer need be built for it.
        let specials = crate::gguf::tokenizer::specials(gguf)?;
        let config = serde_json::json!({"bos_token": specials.bos_text, "eos_token": specials.eos_text});
        Ok(Some(ChatTemplate::new(source, format!("{} (tokenizer.chat_template)", origin.display()), &config)))
    }

    /// `source` with the special tokens `tokenizer_config` names (as strings or AddedToken objects).
    pub fn new(source: String, origin: String, tokenizer_config: &Value) -> ChatTemplate {
        let mut special = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            let token = tokenizer_config.get(key);
            let text = token.and_then(|t| t.as_str().or_else(|| t.get("content")?.as_str()));
            if let Some(text) = text {
                special.insert(key.into(), Value::String(text.into()));
            }
        }
        ChatTemplate { source, origin, special }
    }

    /// The conversation as the model expects it; `add_generation_prompt` appends what opens the
    /// assistant's reply.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        // As transformers' Jinja2 environment.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> { Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message)) });
        env.add_function("strftime_now", |format: String| -> String { strftime_now(&format) });
        env.add_template("chat_template", &self.source).map_err(|e| self.error(&e))?;
        let template = env.get_template("chat_template").map_err(|e| self.error(&e))?;
        let mut vars = self.special.clone();
        vars.insert("messages".into(), serde_json::to_value(messages).unwrap_or(Value::Null));
        vars.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        vars.insert("tools".into(), Value::Null);
        template.render(Value::Object(vars)).map_err(|e| self.error(&e))
    }

    /// The conversation's token ids, as transformers' `apply_chat_template(..., tokenize=True)`.
    pub fn tokens(&self, tokenizer: &crate::tokenizer::Tokenizer, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        tokenizer.encode_rendered(&self.render(messages, add_generation_prompt)?)
    }

    /// A render error naming the template's line and quoting it.
    fn error(&self, e: &minijinja::Error) -> Error {
        let detail = e.detail().map_or(String::new(), |d| format!(": {d}"));
        let place = match e.line() {
            Some(n) => {
                let text = self.source.lines().nth(n.saturating_sub(1)).unwrap_or("").trim();
                let quoted: String = text.chars().take(120).collect();
                format!(", line {n}: `{quoted}`")
            }
            None => String::new(),
        };
        Error::Tokenizer(format!("chat template {}{place}: {}{detail}", self.origin, e.kind()))
    }
}

/// Today's date in the few strftime forms templates use (`%d %b %Y`, `%Y-%m-%d`), in UTC.
fn strftime_now(format: &str) -> String {
    let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format.replace("%Y", &year.to_string()).replace("%m", &format!("{month:02}")).replace("%d", &format!("{day:02}")).replace("%b", MONTHS[(month - 1) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.into(), "test".into(), &serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    }

    #[test]
    fn renders_messages_special_tokens_and_the_generation_prompt() {
        let t = template("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content | trim }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}{{ eos_token }}");
        let text = t.render(&[Message::new("user", " hi ")], true).unwrap();
        assert_eq!(text, "<s>[user] hi\n[assistant]</s>");
    }

    #[test]
    fn python_string_methods_work() {
        let t = template("{% for m in messages %}{{ m.content.split('</think>')[-1].strip() }}{% endfor %}");
        assert_eq!(t.render(&[Message::new("assistant", "a</think> b ")], false).unwrap(), "b");
    }

    #[test]
    fn a_failing_template_names_its_line() {
        let t = template("{% for m in messages %}\n{{ raise_exception('roles must alternate') }}\n{% endfor %}");
        let e = t.render(&[Message::new("user", "x")], false).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("roles must alternate"), "{e}");
        let t = template("ok\n{% if %}");
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("{% if %}"), "{e}");
    }

    #[test]
    fn the_date_function_formats_today() {
        let s = strftime_now("%Y-%m-%d");
        assert_eq!(s.len(), 10);
        assert!(s.starts_with("20"));
    }
}
