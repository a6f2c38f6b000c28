//! `fzc fmt`: one canonical layout for `.fz` files, the style of the language reference's
//! examples, that keeps every comment and never moves a statement to another line.
//!
//! What it changes, line by line:
//! - indentation: two spaces per open `{`, and two more for a rule or assertion that goes on
//!   over several lines (a line after one that ends in `,` or `->`, or that starts with
//!   `when`, `and` or `as`); full-line comments are indented as the code around them;
//! - spacing between tokens: one space, none before `,` and `;`, and after a comma one space or
//!   none as the author wrote it (`sat,sun` stays, `DE , FR` becomes `DE, FR`); so
//!   `{ address "x"; site hq }`; strings and comments are kept byte for byte;
//! - trailing comments: two spaces after the code, aligned within a run of consecutive lines
//!   that all carry one;
//! - line endings: LF, no byte-order mark, no trailing spaces, exactly one newline at the end
//!   of the file (blank lines at its end are dropped).
//!
//! What it never changes is which line a statement is on: a rule's origin (`path:line`) is
//! part of the bundle, and a formatted tree compiles to the same bytes. A rule's derived id
//! hashes its text in this same spacing ([`normalize`]), so formatting keeps ids too. That is also why blank
//! lines inside a file stay as they are. A file that does not parse is not formatted: its
//! syntax errors are returned instead, since the layout of text that is not yet the language
//! cannot be known.

use crate::{Code, Diagnostic, FileId, SourceFile};

/// The file in canonical layout, or the syntax errors that keep it from being formatted.
pub fn format_file(file: FileId, text: &str) -> Result<String, Vec<Diagnostic>> {
    let text = SourceFile::new("", text).text;
    let errors: Vec<Diagnostic> = crate::parse_file(file, &text)
        .1
        .into_iter()
        .filter(|d| d.code == Code::Syntax)
        .collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    let formatted = layout(&text);
    // By construction only whitespace between tokens changed, and no token changed line: the
    // grammar reads the same statements from both (whitespace inside a line separates tokens
    // and means nothing else; the formatter never joins two tokens it kept apart). If that ever
    // failed to hold, the file is left as it was rather than changed in meaning.
    if !tokens_of(&text).eq(tokens_of(&formatted)) {
        return Ok(text);
    }
    Ok(formatted)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a str),
    /// With its quotes, as written.
    Str(&'a str),
    Open,
    Close,
    Comma,
    Semicolon,
    Arrow,
    /// From `#` to the end of the line, as written.
    Comment(&'a str),
}

impl Token<'_> {
    fn text(&self) -> &str {
        match self {
            Token::Word(text) | Token::Str(text) | Token::Comment(text) => text,
            Token::Open => "{",
            Token::Close => "}",
            Token::Comma => ",",
            Token::Semicolon => ";",
            Token::Arrow => "->",
        }
    }
}

/// The tokens of one line, each with whether whitespace stood before it. The line parsed, so
/// strings are closed on it.
fn lex(line: &str) -> Vec<(Token<'_>, bool)> {
    lex_at(line)
        .into_iter()
        .map(|(token, spaced, _)| (token, spaced))
        .collect()
}

/// [`lex`], with each token's byte offset in the line.
fn lex_at(line: &str) -> Vec<(Token<'_>, bool, usize)> {
    let mut tokens = Vec::new();
    let mut rest = line;
    loop {
        let trimmed = rest.trim_start_matches([' ', '\t']);
        let spaced = trimmed.len() < rest.len();
        rest = trimmed;
        let at = line.len() - rest.len();
        let Some(first) = rest.chars().next() else {
            break;
        };
        let (token, length) = match first {
            '#' => (Token::Comment(rest.trim_end()), rest.len()),
            '{' => (Token::Open, 1),
            '}' => (Token::Close, 1),
            ',' => (Token::Comma, 1),
            ';' => (Token::Semicolon, 1),
            '-' if rest.starts_with("->") => (Token::Arrow, 2),
            '"' => {
                let length = string_length(rest);
                (Token::Str(&rest[..length]), length)
            }
            _ => {
                let length = rest
                    .char_indices()
                    .find(|&(i, c)| {
                        matches!(c, ' ' | '\t' | '{' | '}' | ',' | ';' | '"' | '#')
                            || rest[i..].starts_with("->")
                    })
                    .map_or(rest.len(), |(i, _)| i);
                (Token::Word(&rest[..length]), length)
            }
        };
        tokens.push((token, spaced, at));
        rest = &rest[length..];
    }
    tokens
}

/// The length of the string at the start of `text`, quotes included (to the end of the line
/// if it is not closed, which a line that parsed never has).
fn string_length(text: &str) -> usize {
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return i + 1,
            _ => escaped = false,
        }
    }
    text.len()
}

/// The words of a text outside strings and comments (names, keywords, ports, times), each
/// with its byte offset: what an editor's "find references" and "go to definition" look at.
pub fn words(text: &str) -> Vec<(usize, &str)> {
    let mut words = Vec::new();
    let mut line_start = 0;
    for line in text.split('\n') {
        for (token, _, at) in lex_at(line) {
            if let Token::Word(word) = token {
                words.push((line_start + at, word));
            }
        }
        line_start += line.len() + 1;
    }
    words
}

/// Every token of a text with its line, for the check that formatting moved nothing but
/// whitespace.
fn tokens_of(text: &str) -> impl Iterator<Item = (usize, Token<'_>)> {
    text.split('\n')
        .enumerate()
        .flat_map(|(number, line)| lex(line).into_iter().map(move |(t, _)| (number, t)))
}

/// What goes between `previous` and `token` (`spaced`: the author put whitespace there).
fn separator(previous: Option<&Token<'_>>, token: &Token<'_>, spaced: bool) -> &'static str {
    match (previous, token) {
        (None, _) | (_, Token::Comma | Token::Semicolon) => "",
        // After a comma the author's choice stands (`sat,sun`, `DE, FR`); `;` ends a statement,
        // and no rule's text holds one.
        (Some(Token::Comma), _) if !spaced => "",
        _ => " ",
    }
}

/// A statement's text as one line, with comments dropped and the spacing `fzc fmt` gives it
/// (a line break counts as whitespace): what a derived rule id is the hash of, so that
/// neither formatting nor moving the rule over several lines changes the id.
pub(crate) fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut previous = None;
    for (number, line) in text.split('\n').enumerate() {
        for (position, (token, spaced)) in lex(line).into_iter().enumerate() {
            if matches!(token, Token::Comment(_)) {
                continue;
            }
            let spaced = spaced || (position == 0 && number > 0);
            out += separator(previous.as_ref(), &token, spaced);
            out += token.text();
            previous = Some(token);
        }
    }
    out
}

/// One line laid out: its indentation and code, and its trailing comment.
struct Line<'a> {
    code: String,
    comment: Option<&'a str>,
}

fn layout(text: &str) -> String {
    let mut lines = Vec::new();
    let mut depth: usize = 0;
    let mut continues = false;
    for line in text.split('\n') {
        let tokens = lex(line);
        let (code, comment) = match tokens.split_last() {
            Some(((Token::Comment(comment), _), code)) => (code, Some(*comment)),
            _ => (&tokens[..], None),
        };
        let starts = |word| matches!(code.first(), Some((Token::Word(w), _)) if *w == word);
        let closes_first = matches!(code.first(), Some((Token::Close, _)));
        let mut indent = depth.saturating_sub(usize::from(closes_first));
        if !code.is_empty() && (continues || starts("when") || starts("and") || starts("as")) {
            indent += 1;
        }
        let mut laid = String::new();
        if !code.is_empty() || comment.is_some() {
            laid += &"  ".repeat(indent);
        }
        let mut previous = None;
        for (token, spaced) in code {
            laid += separator(previous, token, *spaced);
            laid += token.text();
            previous = Some(token);
        }
        for (token, _) in code {
            match token {
                Token::Open => depth += 1,
                Token::Close => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        if let Some((last, _)) = code.last() {
            continues = matches!(last, Token::Comma | Token::Arrow) && depth == 0;
        }
        lines.push(Line {
            code: laid,
            comment,
        });
    }
    align_comments(&mut lines);
    let mut out: Vec<String> = lines
        .into_iter()
        .map(|line| match line.comment {
            Some(comment) => format!("{}{comment}", line.code),
            None => line.code,
        })
        .collect();
    while out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

/// Pads the code of each run of consecutive lines with code and a trailing comment so that
/// their comments start in one column, two spaces after the longest code of the run.
fn align_comments(lines: &mut [Line<'_>]) {
    let trailing = |line: &Line<'_>| line.comment.is_some() && !line.code.trim().is_empty();
    let mut start = 0;
    while start < lines.len() {
        if !lines.get(start).is_some_and(trailing) {
            start += 1;
            continue;
        }
        let end = (start..lines.len())
            .find(|&i| !lines.get(i).is_some_and(trailing))
            .unwrap_or(lines.len());
        let Some(run) = lines.get_mut(start..end) else {
            break;
        };
        let width = run
            .iter()
            .map(|line| line.code.chars().count())
            .max()
            .unwrap_or(0);
        for line in run {
            let pad = width + 2 - line.code.chars().count();
            line.code += &" ".repeat(pad);
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(text: &str) -> String {
        format_file(FileId(0), text).unwrap_or_else(|errors| panic!("{errors:?}"))
    }

    #[test]
    fn spacing_indentation_and_comments_are_canonical() {
        let messy = "site   hq\t\"Headquarters\"   # the office\n\
                     resource gitlab {\n\
                     address \"gitlab.company.com\"    # required\n\
                     \t  site hq # where\n\
                     ports tcp/443 , tcp/22,icmp\n\
                     }\n\
                     resource wiki {address \"wiki.company.com\" ;site hq}\n\
                     \n\
                     group eng { members \"a@company.com\",\"b@company.com\" }\n\
                     allow eng ->\n\
                     gitlab,\n\
                     wiki\n\
                     when country in DE\n\
                     as eng-tools   \n\
                     \n\n";
        let expected = "site hq \"Headquarters\"  # the office\n\
                        resource gitlab {\n  \
                        address \"gitlab.company.com\"  # required\n  \
                        site hq                       # where\n  \
                        ports tcp/443, tcp/22,icmp\n\
                        }\n\
                        resource wiki { address \"wiki.company.com\"; site hq }\n\
                        \n\
                        group eng { members \"a@company.com\",\"b@company.com\" }\n\
                        allow eng ->\n  \
                        gitlab,\n  \
                        wiki\n  \
                        when country in DE\n  \
                        as eng-tools\n";
        assert_eq!(format(messy), expected);
        assert_eq!(
            format(expected),
            expected,
            "formatting twice changes nothing"
        );
    }

    #[test]
    fn rule_text_is_normalized_as_formatted() {
        assert_eq!(normalize("allow  a ->\tb # note\n"), "allow a -> b");
        assert_eq!(
            normalize("allow user \"x  y\" -> b"),
            "allow user \"x  y\" -> b"
        );
        assert_eq!(
            normalize("allow a , b ->c,\n  d # why\n  when time sat,sun 08:00-09:00 UTC"),
            "allow a, b -> c, d when time sat,sun 08:00-09:00 UTC"
        );
    }

    #[test]
    fn strings_and_comments_are_kept_as_written() {
        let text = "# a  comment;  with \"quotes\" {\n\
                    site hq \"Head  quarters # not a comment, \\\"quoted\\\"\"\n\
                    resource r { address \"r.company.com\"; site hq }\n\
                    group g { members \"a@company.com\" }\n\
                    allow g -> r\n";
        assert_eq!(format(text), text);
    }

    #[test]
    fn line_endings_and_byte_order_mark_become_canonical() {
        let text = "\u{feff}site hq\r\nresource r { address \"r.company.com\"; site hq }\r\n\
                    group g { members \"a@company.com\" }\r\nallow g -> r";
        assert_eq!(
            format(text),
            "site hq\nresource r { address \"r.company.com\"; site hq }\n\
             group g { members \"a@company.com\" }\nallow g -> r\n"
        );
    }

    #[test]
    fn a_file_that_does_not_parse_is_not_formatted() {
        let errors = format_file(FileId(3), "site hq\nallow g gitlab\n").unwrap_err();
        assert!(!errors.is_empty());
        assert!(errors.iter().all(|d| d.code == Code::Syntax));
    }

    #[test]
    fn no_statement_changes_line() {
        let text = "\n\n  site hq   \n\n\nresource r {\n address \"r.company.com\"\n\n site hq\n}\n\
                    group g { members \"a@company.com\" }\nallow g -> r\n";
        let formatted = format(text);
        assert_eq!(
            formatted.lines().count(),
            text.lines().count(),
            "{formatted}"
        );
        let lines_of = |text: &str, word: &str| {
            text.lines()
                .position(|line| line.contains(word))
                .unwrap_or(usize::MAX)
        };
        for word in ["site hq", "resource r", "allow g"] {
            assert_eq!(lines_of(text, word), lines_of(&formatted, word), "{word}");
        }
    }
}
