//! The fz policy language front end: the grammar (pest), the Cedar front end (`*.cedar`
//! policies lowered to the same rules), the syntax tree whose nodes carry their file and span,
//! the diagnostic type every later stage reports with, and the set of source files a tree is
//! made of.
//!
//! It does no IO and no validation of values: addresses, ports, times and names are kept as
//! written, and checked by the compiler (`fz-compiler`), so that each bad value gets its own
//! diagnostic. Rendering diagnostics (human or JSON) belongs to the command-line tool.
//!
//! Entry points: [`parse_file`] (text to [`ast::PolicyFile`] plus diagnostics),
//! [`parse_cedar_file`] (the same for a `.cedar` file: each `permit`/`forbid` becomes an
//! `allow`/`deny` rule, and what a decision table cannot hold is an `E017`), [`format_file`]
//! (a `.fz` file in canonical layout, for `fzc fmt`), [`Sources`], [`Diagnostic`] and its
//! stable [`Code`]s.

pub mod ast;
mod cedar;
mod diagnostic;
mod format;
mod parse;
mod source;
mod suggest;

pub use cedar::parse_cedar_file;
pub use diagnostic::{Code, Diagnostic, Severity};
pub use format::{format_file, words};
pub use parse::parse_file;
pub use source::{FileId, Loc, Node, SourceFile, Sources, Span};
pub use suggest::did_you_mean;
