//! The page templates, compiled into the binary (`include_str!`) and auto-escaped: every
//! `{{ value }}` in them is HTML-escaped, so producer-supplied text is shown as text.

use minijinja::{AutoEscape, Environment};
use serde::Serialize;

const TEMPLATES: [(&str, &str); 6] = [
    ("base.html", include_str!("../templates/base.html")),
    ("overview.html", include_str!("../templates/overview.html")),
    ("jobs.html", include_str!("../templates/jobs.html")),
    ("job.html", include_str!("../templates/job.html")),
    ("login.html", include_str!("../templates/login.html")),
    ("message.html", include_str!("../templates/message.html")),
];

/// The compiled templates.
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// Compiles every template; a syntax error is reported at start-up, not on first use.
    pub fn new() -> Result<Templates, minijinja::Error> {
        let mut env = Environment::new();
        // Everything is HTML, escaped, whatever the name.
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.add_filter("urlencode_key", |s: String| crate::filters::encode(&s));
        for (name, source) in TEMPLATES {
            env.add_template(name, source)?;
        }
        Ok(Templates { env })
    }

    pub fn render(&self, name: &str, ctx: impl Serialize) -> Result<String, minijinja::Error> {
        self.env.get_template(name)?.render(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_text_is_escaped() {
        let t = Templates::new().unwrap();
        let html = t
            .render(
                "message.html",
                minijinja::context! {
                    title => "<script>alert(1)</script>",
                    message => "\"><img src=x onerror=alert(2)>",
                    status => 400,
                },
            )
            .unwrap();
        assert!(!html.contains("<script>alert"));
        assert!(!html.contains("<img src=x"));
        assert!(html.contains("&lt;script&gt;"));
    }
}
