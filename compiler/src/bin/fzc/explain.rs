//! `fzc explain CODE`: what a diagnostic code means, an example that gives it, and the fix.
//!
//! The text is the code's own subsection of the language reference (`docs/language.md`,
//! "Diagnostics", one `### CODE: title` each), built into the binary, so that the reference,
//! `fzc explain` and the help of SARIF rules are one text that cannot drift apart.

/// The language reference, as of this build.
const REFERENCE: &str = include_str!("../../../../docs/language.md");

/// One code's subsection of the reference.
#[derive(Clone, Copy, Debug)]
pub struct Explanation {
    pub code: &'static str,
    pub title: &'static str,
    /// The whole subsection, its heading included, as Markdown.
    pub text: &'static str,
}

impl Explanation {
    /// The code written as `fzc` prints it, whatever the case it was asked in (`e019`).
    pub fn of(code: &str) -> Option<Explanation> {
        all().find(|e| e.code.eq_ignore_ascii_case(code.trim()))
    }

    /// The first paragraph under the heading: what the code means, in a sentence or two.
    pub fn summary(&self) -> String {
        self.text
            .lines()
            .skip(1)
            .skip_while(|line| line.trim().is_empty())
            .take_while(|line| !line.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The anchor GitHub and most Markdown renderers give the heading (`e019-invariant-failed`).
    pub fn anchor(&self) -> String {
        let heading = format!("{} {}", self.code, self.title).to_lowercase();
        heading
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect()
    }
}

/// Every code the reference explains, in its order.
pub fn all() -> impl Iterator<Item = Explanation> {
    let mut sections = Vec::new();
    let mut start = None;
    let mut offset = 0;
    for line in REFERENCE.split_inclusive('\n') {
        let is_heading = line.starts_with("## ") || line.starts_with("### ");
        if is_heading && let Some((heading, from)) = start.take() {
            sections.push((heading, &REFERENCE[from..offset]));
        }
        if let Some(heading) = line.strip_prefix("### ")
            && code_heading(heading).is_some()
        {
            start = Some((heading.trim_end(), offset));
        }
        offset += line.len();
    }
    if let Some((heading, from)) = start {
        sections.push((heading, &REFERENCE[from..]));
    }
    sections.into_iter().filter_map(|(heading, text)| {
        let (code, title) = code_heading(heading)?;
        Some(Explanation {
            code,
            title,
            text: text.trim_end(),
        })
    })
}

/// `E019: invariant failed` as its code and title.
fn code_heading(heading: &str) -> Option<(&str, &str)> {
    let (code, title) = heading.trim_end().split_once(": ")?;
    let well_formed = code.len() == 4
        && (code.starts_with('E') || code.starts_with('W'))
        && code[1..].chars().all(|c| c.is_ascii_digit());
    well_formed.then_some((code, title))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_explained_once_in_order() {
        let explained: Vec<&str> = all().map(|e| e.code).collect();
        let codes: Vec<&str> = fz_lang::Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(explained, codes);
    }

    #[test]
    fn an_explanation_has_a_summary_an_example_and_a_fix() {
        for explanation in all() {
            let code = explanation.code;
            assert!(!explanation.summary().is_empty(), "{code}: no summary");
            assert!(explanation.text.contains("\n```"), "{code}: no example");
            assert!(explanation.text.contains("\nFix: "), "{code}: no fix");
        }
    }

    #[test]
    fn codes_are_found_whatever_their_case() {
        let explanation = Explanation::of("e019").map(|e| e.code);
        assert_eq!(explanation, Some("E019"));
        assert!(Explanation::of("E999").is_none());
        assert!(Explanation::of("").is_none());
    }
}
