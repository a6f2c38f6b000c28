//! The sign-in pages' HTML: server-rendered, no script, one inline style sheet. Everything that
//! comes from a request or the configuration is escaped here, in [`escape`], and nowhere else
//! builds markup.

/// HTML-escapes text for an element's content or a quoted attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "\
*{box-sizing:border-box}\
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;\
background:#f3f4f6;color:#111827;font:16px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif}\
main{background:#fff;width:min(26rem,92vw);padding:2rem 2rem 1.5rem;border-radius:12px;\
box-shadow:0 1px 3px rgba(0,0,0,.08),0 8px 24px rgba(0,0,0,.06)}\
.brand{font-weight:700;letter-spacing:.04em;color:#4f46e5;font-size:.9rem;text-transform:uppercase}\
h1{font-size:1.35rem;margin:.25rem 0 1.25rem}\
p{margin:.5rem 0 1rem;color:#374151}\
label{display:block;font-weight:600;font-size:.9rem;margin-bottom:.35rem}\
input[type=email],input[type=text]{width:100%;padding:.65rem .75rem;border:1px solid #d1d5db;\
border-radius:8px;font-size:1rem}\
input:focus{outline:2px solid #6366f1;border-color:#6366f1}\
input.code{font:600 1.4rem ui-monospace,monospace;letter-spacing:.2em;text-align:center}\
button,a.button{display:block;box-sizing:border-box;width:100%;margin-top:.9rem;padding:.7rem;\
border:0;border-radius:8px;background:#4f46e5;color:#fff;font-size:1rem;font-weight:600;\
cursor:pointer;text-align:center;text-decoration:none}\
button:hover,a.button:hover{background:#4338ca}\
.error{background:#fef2f2;color:#991b1b;border:1px solid #fecaca;padding:.6rem .75rem;\
border-radius:8px;font-size:.95rem}\
.method{margin-top:1.25rem}\
.fine{font-size:.85rem;color:#6b7280;margin-top:1.25rem}\
code{background:#f3f4f6;padding:.1rem .3rem;border-radius:4px;font-size:.9em}";

/// A whole page around `body` (already markup).
fn document(title: &str, account: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title} · {account}</title><style>{STYLE}</style></head><body><main>\
         <div class=\"brand\">fz · {account}</div>{body}</main></body></html>",
        title = escape(title),
        account = escape(account),
    )
}

fn error_box(error: Option<&str>) -> String {
    error.map_or_else(String::new, |e| {
        format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e))
    })
}

/// The methods an account offers on its sign-in page.
#[derive(Debug, Clone, Default)]
pub struct Methods {
    pub email: bool,
    /// OpenID Connect providers: (id, name shown).
    pub oidc: Vec<(String, String)>,
}

/// The page a client's sign-in lands on: each method the account offers.
pub fn methods(
    account: &str,
    device: &str,
    methods: &Methods,
    csrf: &str,
    error: Option<&str>,
) -> String {
    let mut body = format!(
        "<h1>Sign in</h1><p>Sign in to <strong>{account}</strong> to connect \
         <strong>{device}</strong>.</p>{error}",
        account = escape(account),
        device = escape(device),
        error = error_box(error),
    );
    // A link, not a form: its answer redirects to the provider, and a form's redirect to an
    // origin the page's `form-action` does not name is blocked (the provider's authorization
    // endpoint is not known before discovery). The anti-forgery token rides in the query.
    for (id, name) in &methods.oidc {
        body.push_str(&format!(
            "<p class=\"method\"><a class=\"button\" id=\"oidc-{id}\" \
             href=\"/{account}/sign-in/oidc/{id}?csrf={csrf}\">Sign in with {name}</a></p>",
            account = escape(account),
            id = escape(id),
            name = escape(name),
            csrf = escape(csrf),
        ));
    }
    if !methods.oidc.is_empty() && methods.email {
        body.push_str("<p class=\"fine\" style=\"text-align:center\">or</p>");
    }
    if methods.email {
        body.push_str(&format!(
            "<form class=\"method\" method=\"post\" action=\"/{account}/sign-in/email\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label for=\"email\">Email address</label>\
             <input id=\"email\" type=\"email\" name=\"email\" autocomplete=\"email\" required \
             maxlength=\"254\" autofocus>\
             <button type=\"submit\">Email me a sign-in code</button></form>",
            account = escape(account),
            csrf = escape(csrf),
        ));
    }
    if !methods.email && methods.oidc.is_empty() {
        body.push_str(
            "<p class=\"error\">This account offers no way to sign in. Ask its administrator.</p>",
        );
    }
    body.push_str(
        "<p class=\"fine\">When you are signed in, this page hands your device its token and \
         you can close it.</p>",
    );
    document("Sign in", account, &body)
}

/// The page that asks for the code sent to `email`.
pub fn code(account: &str, email: &str, csrf: &str, error: Option<&str>) -> String {
    let body = format!(
        "<h1>Check your email</h1><p>If <strong>{email}</strong> may sign in to \
         <strong>{account_text}</strong>, a code is on its way to it. It works once, for 15 \
         minutes.</p>{error}\
         <form method=\"post\" action=\"/{account}/sign-in/email/code\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label for=\"code\">Sign-in code</label>\
         <input id=\"code\" class=\"code\" type=\"text\" name=\"code\" autocomplete=\"one-time-code\" \
         required maxlength=\"16\" placeholder=\"ABCD-EFGH\" autofocus spellcheck=\"false\">\
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"fine\"><a href=\"/{account}\">Use another address or ask for a new code</a></p>",
        email = escape(email),
        account_text = escape(account),
        account = escape(account),
        csrf = escape(csrf),
        error = error_box(error),
    );
    document("Enter your code", account, &body)
}

/// A page that only says something: `title`, then `text`.
pub fn message(account: &str, title: &str, text: &str) -> String {
    let body = format!("<h1>{}</h1><p>{}</p>", escape(title), escape(text));
    document(title, account, &body)
}

/// The page for someone who came to the account's sign-in page without a client.
pub fn start_from_the_client(account: &str, portal: &str) -> String {
    let body = format!(
        "<h1>Sign in from the fz client</h1><p>Sign-ins start on the device that connects. \
         On it, run</p><p><code>fz-client sign-in --portal-url {portal} --account {account}</code></p>\
         <p>and finish in the browser window it opens.</p>",
        portal = escape(portal),
        account = escape(account),
    );
    document("Sign in", account, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_comes_from_outside_is_escaped() {
        let page = code(
            "acme",
            "<script>alert(1)</script>@x\"'",
            "\"><img src=x>",
            Some("<b>"),
        );
        assert!(!page.contains("<script>alert"));
        assert!(!page.contains("\"><img"));
        assert!(!page.contains("<b>"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;@x&quot;&#39;"));
    }
}
