//! Source files, locations and the node wrapper that carries them.

use std::fmt;

/// Index of a file in a [`Sources`] set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId(pub u32);

impl FileId {
    /// Not a file: the tree as a whole, where a diagnostic is about what the tree lacks
    /// (`E021`). No [`Sources`] holds it, so it sorts after every file; renderers name the
    /// tree's directory in its place.
    pub const TREE: FileId = FileId(u32::MAX);
}

/// A byte range inside one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span {
            start: to_u32(start),
            end: to_u32(end),
        }
    }
}

fn to_u32(offset: usize) -> u32 {
    u32::try_from(offset).unwrap_or(u32::MAX)
}

/// Where something is: a file and a span in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Loc {
    pub file: FileId,
    pub span: Span,
}

/// A syntax tree value with its location. Equality and hashing ignore the location, so two
/// trees that say the same thing compare equal wherever they were written.
#[derive(Clone, Debug)]
pub struct Node<T> {
    pub node: T,
    pub loc: Loc,
}

impl<T> Node<T> {
    pub fn new(node: T, loc: Loc) -> Self {
        Node { node, loc }
    }
}

impl<T: PartialEq> PartialEq for Node<T> {
    fn eq(&self, other: &Self) -> bool {
        self.node == other.node
    }
}

impl<T: Eq> Eq for Node<T> {}

impl<T: std::hash::Hash> std::hash::Hash for Node<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.node.hash(state);
    }
}

impl<T: fmt::Display> fmt::Display for Node<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.node.fmt(f)
    }
}

/// One policy file: its path relative to the tree root (always with `/`) and its text, with a
/// leading byte-order mark dropped and every CRLF line ending read as a newline.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub path: String,
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(path: impl Into<String>, text: impl Into<String>) -> Self {
        // Line endings are normalised here, once, where a file's text enters fz, and not in
        // each front end's cutting or lexing: the `.fz` splitter and grammar, the Cedar token
        // scan and cedar-policy's own parser then all read one text, and spans, the lines the
        // renderer shows (no stray `\r` under a caret), line:column, derived rule ids and the
        // bundle come out of a Windows file exactly as out of the same file written on Linux.
        // Nothing exposes byte offsets of the file on disk; lines and columns (in characters)
        // are what an editor shows, where a CRLF is one line break and a BOM is not shown.
        let text = normalize_line_endings(text.into());
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        SourceFile {
            path: path.into(),
            text,
            line_starts,
        }
    }

    /// One-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: u32) -> (usize, usize) {
        let offset = (offset as usize).min(self.text.len());
        let line = self
            .line_starts
            .partition_point(|&start| start <= offset)
            .max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(0, |s| s.chars().count())
            + 1;
        (line, column)
    }

    /// The text of a one-based line, without its line break.
    pub fn line_text(&self, line: usize) -> &str {
        let start = self
            .line_starts
            .get(line.wrapping_sub(1))
            .copied()
            .unwrap_or(0);
        let end = self
            .line_starts
            .get(line)
            .copied()
            .unwrap_or(self.text.len());
        self.text
            .get(start..end)
            .unwrap_or("")
            .trim_end_matches(['\n', '\r'])
    }
}

/// The text without a leading byte-order mark and with CRLF read as LF. A carriage return
/// that ends no line is kept: it is not a line break, and the parser says so where it stands.
fn normalize_line_endings(text: String) -> String {
    let text = match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    };
    if text.contains("\r\n") {
        text.replace("\r\n", "\n")
    } else {
        text
    }
}

/// Every file of a policy tree, sorted by path so that the order files were found in never
/// changes what is compiled.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    files: Vec<SourceFile>,
}

impl Sources {
    pub fn new(mut files: Vec<SourceFile>) -> Self {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Sources { files }
    }

    pub fn iter(&self) -> impl Iterator<Item = (FileId, &SourceFile)> {
        self.files
            .iter()
            .enumerate()
            .map(|(i, f)| (FileId(to_u32(i)), f))
    }

    pub fn get(&self, id: FileId) -> Option<&SourceFile> {
        self.files.get(id.0 as usize)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Path, one-based line and column of a location.
    pub fn position(&self, loc: Loc) -> (&str, usize, usize) {
        match self.get(loc.file) {
            Some(file) => {
                let (line, column) = file.line_col(loc.span.start);
                (&file.path, line, column)
            }
            None => ("", 0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_order_mark_and_crlf_line_endings_read_as_the_plain_text() {
        let cases = [
            ("site hq\r\nsite lab\r\n", "site hq\nsite lab\n"),
            ("\u{feff}site hq\n", "site hq\n"),
            (
                "\u{feff}site hq\r\nsite lab\n# note\r\n",
                "site hq\nsite lab\n# note\n",
            ),
            // Not a line ending: kept, for the parser to point at.
            ("site hq\rsite lab\r\r\n", "site hq\rsite lab\r\n"),
            // Only a leading mark is dropped.
            ("site hq \u{feff}\n", "site hq \u{feff}\n"),
            ("\u{feff}\u{feff}x", "\u{feff}x"),
        ];
        for (text, expected) in cases {
            assert_eq!(SourceFile::new("a.fz", text).text, expected, "{text:?}");
        }
    }

    #[test]
    fn lines_and_columns_are_those_of_the_plain_text() {
        let file = SourceFile::new("a.fz", "\u{feff}site hq\r\n  site lab\r\n");
        assert_eq!(file.line_col(0), (1, 1));
        assert_eq!(file.line_col(10), (2, 3));
        assert_eq!(file.line_text(1), "site hq");
        assert_eq!(file.line_text(2), "  site lab");
    }
}
