//! From text to [`PolicyFile`]: a statement splitter, the pest grammar, and the translation of
//! pest's output (pairs and errors) into syntax nodes and diagnostics. Pest types never leave
//! this module.

use pest::Parser as _;
use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;

use crate::ast::*;
use crate::diagnostic::{Code, Diagnostic};
use crate::source::{FileId, Loc, Node, Span};

#[derive(pest_derive::Parser)]
#[grammar = "fz.pest"]
struct Grammar;

/// Parses one file, collecting a diagnostic for every statement that does not parse. The
/// statements that do parse are returned either way, and so is what can be read of a
/// declaration that does not (see [`Builder::recover`]).
///
/// `text` is a file's text as [`crate::SourceFile`] holds it: a CRLF is read as a newline
/// there, once for every front end, and spans point into that text.
pub fn parse_file(file: FileId, text: &str) -> (PolicyFile, Vec<Diagnostic>) {
    let mut policy = PolicyFile::default();
    let mut diagnostics = Vec::new();
    for chunk in split_statements(text) {
        let Some(chunk_text) = text.get(chunk.start..chunk.end) else {
            continue;
        };
        let builder = Builder {
            file,
            offset: chunk.start,
        };
        match Grammar::parse(Rule::statement, chunk_text) {
            Ok(mut pairs) => {
                let Some(statement) = pairs.next() else {
                    continue;
                };
                match builder.statement(statement, chunk_text, &mut diagnostics) {
                    Some(s) => policy.statements.push(s),
                    None => continue,
                }
            }
            Err(error) => {
                policy
                    .statements
                    .extend(builder.recover(chunk_text, &error, &mut diagnostics))
            }
        }
    }
    (policy, diagnostics)
}

/// A statement's byte range in the file.
#[derive(Debug, PartialEq, Eq)]
struct Chunk {
    start: usize,
    end: usize,
}

/// Words that begin a statement. A line starting with one of these ends an unclosed block, so
/// that a missing `}` costs one diagnostic, not the rest of the file. (`site` is left out: it
/// is also a property inside `resource` blocks.)
const STATEMENT_KEYWORDS: [&str; 6] = ["resource", "group", "allow", "deny", "test", "assert"];

/// Cuts a file at newlines and `;` that stand outside braces, strings and comments.
fn split_statements(text: &str) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut depth = 0usize;
    let mut in_string = false;
    let mut in_comment = false;
    let mut escaped = false;
    let mut has_content = false;
    // The last two significant characters of the current line: a line ending in `,` or `->`
    // goes on on the next one.
    let mut tail = String::new();
    let mut push = |start: usize, end: usize, has_content: bool| {
        if has_content {
            chunks.push(Chunk { start, end });
        }
    };
    for (i, c) in text.char_indices() {
        if c == '\n' {
            // Strings and comments never span lines.
            in_string = false;
            in_comment = false;
            escaped = false;
            let rest = text.get(i + 1..).unwrap_or("");
            if depth > 0 && starts_statement(rest) {
                depth = 0;
            }
            let continued = depth == 0
                && (tail.ends_with(',') || tail.ends_with("->") || continues_statement(rest));
            tail.clear();
            if depth == 0 && !continued {
                push(start, i, has_content);
                start = i + 1;
                has_content = false;
            }
            continue;
        }
        if in_comment {
            continue;
        }
        if in_string {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => escaped = false,
            }
            continue;
        }
        match c {
            '#' => in_comment = true,
            '"' => in_string = true,
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ';' if depth == 0 => {
                push(start, i, has_content);
                start = i + 1;
                has_content = false;
                continue;
            }
            _ => {}
        }
        if !c.is_whitespace() && c != '#' {
            has_content = true;
            if tail.len() >= 2 {
                tail.remove(0);
            }
            tail.push(c);
        }
    }
    push(start, text.len(), has_content);
    chunks
}

/// Words that go on a rule from the line before.
const CONTINUATION_KEYWORDS: [&str; 3] = ["when", "and", "as"];

fn continues_statement(line: &str) -> bool {
    let line = line.trim_start_matches([' ', '\t']);
    CONTINUATION_KEYWORDS.iter().any(|kw| {
        line.strip_prefix(kw)
            .is_some_and(|rest| rest.starts_with([' ', '\t']))
    })
}

fn starts_statement(line: &str) -> bool {
    let line = line.trim_start_matches([' ', '\t']);
    STATEMENT_KEYWORDS.iter().any(|kw| {
        line.strip_prefix(kw)
            .is_some_and(|rest| rest.starts_with([' ', '\t']))
    })
}

/// Turns pest pairs of one statement into syntax nodes, with spans made file-relative.
struct Builder {
    file: FileId,
    offset: usize,
}

impl Builder {
    fn loc(&self, pair: &Pair<'_, Rule>) -> Loc {
        let span = pair.as_span();
        Loc {
            file: self.file,
            span: Span::new(self.offset + span.start(), self.offset + span.end()),
        }
    }

    fn node<T>(&self, pair: &Pair<'_, Rule>, value: T) -> Node<T> {
        Node::new(value, self.loc(pair))
    }

    fn text(&self, pair: &Pair<'_, Rule>) -> Node<String> {
        self.node(pair, pair.as_str().to_owned())
    }

    fn statement(
        &self,
        pair: Pair<'_, Rule>,
        chunk_text: &str,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Option<Statement> {
        let inner = pair.into_inner().find(|p| p.as_rule() != Rule::EOI)?;
        Some(match inner.as_rule() {
            Rule::site_decl => Statement::Site(self.site(inner)),
            Rule::resource_decl => Statement::Resource(self.resource(inner, diagnostics)),
            Rule::group_decl => Statement::Group(self.group(inner, diagnostics)),
            Rule::access_rule => Statement::Rule(self.rule(inner, chunk_text)),
            Rule::test_block => Statement::Test(self.test(inner)),
            Rule::assertion => Statement::Assert(self.assertion(inner)),
            _ => return None,
        })
    }

    fn site(&self, pair: Pair<'_, Rule>) -> Node<SiteDecl> {
        let loc = self.loc(&pair);
        let mut name = Node::new(String::new(), loc);
        let mut description = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::ident => name = self.text(&p),
                Rule::string => description = Some(unescape(&p)),
                _ => {}
            }
        }
        Node::new(SiteDecl { name, description }, loc)
    }

    fn resource(
        &self,
        pair: Pair<'_, Rule>,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Node<ResourceDecl> {
        let loc = self.loc(&pair);
        let mut decl = empty_resource(Node::new(String::new(), loc));
        let mut seen = PropertyTracker::default();
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::ident => decl.name = self.text(&p),
                Rule::resource_block => {
                    for prop in p.into_inner() {
                        self.resource_prop(&mut decl, &mut seen, prop, diagnostics);
                    }
                }
                _ => {}
            }
        }
        Node::new(decl, loc)
    }

    /// One property of a resource block (`{` and `}` are passed over).
    fn resource_prop(
        &self,
        decl: &mut ResourceDecl,
        seen: &mut PropertyTracker,
        prop: Pair<'_, Rule>,
        diagnostics: &mut Vec<Diagnostic>,
    ) {
        let rule = prop.as_rule();
        if matches!(rule, Rule::open | Rule::close) {
            return;
        }
        seen.note(self, &prop, diagnostics);
        let mut values = prop.into_inner();
        if rule == Rule::ports_prop {
            decl.ports = Some(values.map(|spec| self.port(spec)).collect());
            return;
        }
        let Some(value) = values.next() else { return };
        match rule {
            Rule::address_prop => {
                let text = match value.as_rule() {
                    Rule::internet => AddressText::Internet,
                    _ => AddressText::Quoted(unescape(&value)),
                };
                decl.address = Some(self.node(&value, text));
            }
            Rule::site_prop => decl.site = Some(self.text(&value)),
            Rule::description_prop => decl.description = Some(unescape(&value)),
            _ => {}
        }
    }

    fn port(&self, pair: Pair<'_, Rule>) -> Node<PortSpec> {
        let loc = self.loc(&pair);
        let mut spec = PortSpec {
            protocol: Protocol::Icmp,
            first: 0,
            last: 0,
        };
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::icmp => spec.protocol = Protocol::Icmp,
                Rule::protocol => {
                    spec.protocol = if p.as_str() == "udp" {
                        Protocol::Udp
                    } else {
                        Protocol::Tcp
                    };
                }
                Rule::port_range => {
                    let numbers: Vec<u32> = p
                        .into_inner()
                        .map(|n| n.as_str().parse::<u32>().unwrap_or(u32::MAX))
                        .collect();
                    spec.first = numbers.first().copied().unwrap_or(0);
                    spec.last = numbers.get(1).copied().unwrap_or(spec.first);
                }
                _ => {}
            }
        }
        Node::new(spec, loc)
    }

    fn group(&self, pair: Pair<'_, Rule>, diagnostics: &mut Vec<Diagnostic>) -> Node<GroupDecl> {
        let loc = self.loc(&pair);
        let mut decl = empty_group(Node::new(String::new(), loc));
        let mut seen = PropertyTracker::default();
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::ident => decl.name = self.text(&p),
                Rule::group_block => {
                    for prop in p.into_inner() {
                        self.group_prop(&mut decl, &mut seen, prop, diagnostics);
                    }
                }
                _ => {}
            }
        }
        Node::new(decl, loc)
    }

    /// One property of a group block (`{` and `}` are passed over).
    fn group_prop(
        &self,
        decl: &mut GroupDecl,
        seen: &mut PropertyTracker,
        prop: Pair<'_, Rule>,
        diagnostics: &mut Vec<Diagnostic>,
    ) {
        match prop.as_rule() {
            Rule::members_prop => decl
                .members
                .extend(prop.into_inner().map(|s| self.node(&s, unescape(&s)))),
            Rule::idp_prop => {
                let prop_loc = self.loc(&prop);
                let mut provider = Node::new(String::new(), prop_loc);
                let mut group = String::new();
                for part in prop.into_inner() {
                    match part.as_rule() {
                        Rule::ident => provider = self.text(&part),
                        Rule::string => group = unescape(&part),
                        _ => {}
                    }
                }
                decl.idp
                    .push(Node::new(IdpBinding { provider, group }, prop_loc));
            }
            Rule::description_prop => {
                seen.note(self, &prop, diagnostics);
                decl.description = prop.into_inner().next().map(|s| unescape(&s));
            }
            _ => {}
        }
    }

    fn rule(&self, pair: Pair<'_, Rule>, chunk_text: &str) -> Node<RuleDecl> {
        let loc = self.loc(&pair);
        let mut decl = RuleDecl {
            effect: Effect::Allow,
            subjects: Vec::new(),
            targets: Vec::new(),
            conditions: Vec::new(),
            name: None,
            normalized_text: String::new(),
        };
        let span = pair.as_span();
        let rule_text = chunk_text.get(span.start()..span.end()).unwrap_or("");
        let mut text_end = rule_text.len();
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::effect => decl.effect = effect(&p),
                Rule::subjects => decl.subjects = self.subjects(p),
                Rule::targets => {
                    // Deny rules reach down into narrower resources; allow rules do not. The
                    // effect comes first in the grammar.
                    let covers_inside = decl.effect == Effect::Deny;
                    decl.targets = self
                        .targets(p)
                        .into_iter()
                        .map(|t| {
                            let target = RuleTarget {
                                target: t.node,
                                covers_inside,
                            };
                            Node::new(target, t.loc)
                        })
                        .collect();
                }
                Rule::when_clause => {
                    decl.conditions = p
                        .into_inner()
                        .filter(|c| c.as_rule() != Rule::kw_and && c.as_rule() != Rule::kw_when)
                        .map(|c| self.condition(c))
                        .collect();
                }
                Rule::as_clause => {
                    text_end = p.as_span().start() - span.start();
                    decl.name = p
                        .into_inner()
                        .find(|n| n.as_rule() == Rule::ident)
                        .map(|n| self.text(&n));
                }
                _ => {}
            }
        }
        decl.normalized_text =
            crate::format::normalize(rule_text.get(..text_end).unwrap_or(rule_text));
        Node::new(decl, loc)
    }

    fn subjects(&self, pair: Pair<'_, Rule>) -> Vec<Node<Subject>> {
        pair.into_inner()
            .map(|subject| {
                let loc = self.loc(&subject);
                let value = match subject.into_inner().next() {
                    Some(inner) if inner.as_rule() == Rule::user_subject => {
                        let email = inner.into_inner().find(|p| p.as_rule() == Rule::string);
                        Subject::User(email.map(|e| unescape(&e)).unwrap_or_default())
                    }
                    Some(inner) => Subject::Group(inner.as_str().to_owned()),
                    None => Subject::Group(String::new()),
                };
                Node::new(value, loc)
            })
            .collect()
    }

    fn targets(&self, pair: Pair<'_, Rule>) -> Vec<Node<Target>> {
        pair.into_inner()
            .map(|target| {
                let loc = self.loc(&target);
                let value = match target.into_inner().next() {
                    Some(inner) if inner.as_rule() == Rule::site_target => {
                        let site = inner.into_inner().find(|p| p.as_rule() == Rule::ident);
                        Target::Site(site.map(|s| s.as_str().to_owned()).unwrap_or_default())
                    }
                    Some(inner) => Target::Resource(inner.as_str().to_owned()),
                    None => Target::Resource(String::new()),
                };
                Node::new(value, loc)
            })
            .collect()
    }

    fn condition(&self, pair: Pair<'_, Rule>) -> Node<Condition> {
        let loc = self.loc(&pair);
        let rule = pair.as_rule();
        let negated = pair
            .clone()
            .into_inner()
            .any(|p| p.as_rule() == Rule::kw_not);
        let condition = match rule {
            Rule::time_cond => {
                let mut days = Vec::new();
                let mut windows = Vec::new();
                let mut zone = Node::new(String::new(), loc);
                for p in pair.into_inner() {
                    match p.as_rule() {
                        Rule::days => {
                            for range in p.into_inner() {
                                let names: Vec<String> = range
                                    .clone()
                                    .into_inner()
                                    .map(|d| d.as_str().to_owned())
                                    .collect();
                                let mut names = names.into_iter();
                                let first = names.next().unwrap_or_default();
                                days.push(self.node(
                                    &range,
                                    DayRange {
                                        first,
                                        last: names.next(),
                                    },
                                ));
                            }
                        }
                        Rule::window => {
                            let clocks: Vec<String> = p
                                .clone()
                                .into_inner()
                                .map(|c| c.as_str().to_owned())
                                .collect();
                            let mut clocks = clocks.into_iter();
                            let start = clocks.next().unwrap_or_default();
                            let end = clocks.next().unwrap_or_default();
                            windows.push(self.node(&p, Window { start, end }));
                        }
                        Rule::time_zone => zone = self.text(&p),
                        _ => {}
                    }
                }
                Condition::Time {
                    days,
                    windows,
                    zone,
                }
            }
            Rule::country_cond => Condition::Country {
                negated,
                codes: pair
                    .into_inner()
                    .filter(|p| p.as_rule() == Rule::country_code)
                    .map(|p| self.text(&p))
                    .collect(),
            },
            Rule::source_cond => Condition::Source {
                negated,
                networks: pair
                    .into_inner()
                    .filter(|p| p.as_rule() == Rule::network)
                    .map(|p| self.text(&p))
                    .collect(),
            },
            Rule::provider_cond => Condition::Provider(
                pair.into_inner()
                    .next()
                    .map(|p| self.text(&p))
                    .unwrap_or_else(|| Node::new(String::new(), loc)),
            ),
            _ => Condition::ClientVerified,
        };
        Node::new(condition, loc)
    }

    fn test(&self, pair: Pair<'_, Rule>) -> Node<TestDecl> {
        let loc = self.loc(&pair);
        let mut decl = TestDecl {
            name: Node::new(String::new(), loc),
            steps: Vec::new(),
        };
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::string => decl.name = self.node(&p, unescape(&p)),
                Rule::test_body => {
                    for step in p.into_inner() {
                        self.test_step(&mut decl, step);
                    }
                }
                _ => {}
            }
        }
        Node::new(decl, loc)
    }

    /// One step of a test block (`{` and `}` are passed over).
    fn test_step(&self, decl: &mut TestDecl, step: Pair<'_, Rule>) {
        match step.as_rule() {
            Rule::given => decl.steps.push(TestStep::Given(self.given(step))),
            Rule::expect => decl.steps.push(TestStep::Expect(self.expect(step))),
            _ => {}
        }
    }

    fn given(&self, pair: Pair<'_, Rule>) -> Node<Given> {
        let loc = self.loc(&pair);
        let mut given = Given {
            user: Node::new(String::new(), loc),
            groups: Vec::new(),
        };
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::string => given.user = self.node(&p, unescape(&p)),
                Rule::ident => given.groups.push(self.text(&p)),
                _ => {}
            }
        }
        Node::new(given, loc)
    }

    fn expect(&self, pair: Pair<'_, Rule>) -> Node<Expect> {
        let loc = self.loc(&pair);
        let mut expect = Expect {
            effect: Effect::Allow,
            user: Node::new(String::new(), loc),
            resource: Node::new(String::new(), loc),
            port: None,
            context: Vec::new(),
        };
        for p in pair.into_inner() {
            let word_loc = self.loc(&p);
            let value = || {
                p.clone()
                    .into_inner()
                    .next()
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            match p.as_rule() {
                Rule::effect => expect.effect = effect(&p),
                Rule::string => expect.user = self.node(&p, unescape(&p)),
                Rule::ident => expect.resource = self.text(&p),
                Rule::port_spec => expect.port = Some(self.port(p)),
                Rule::at_ctx => expect
                    .context
                    .push(Node::new(ContextWord::At(value()), word_loc)),
                Rule::from_ctx => expect
                    .context
                    .push(Node::new(ContextWord::From(value()), word_loc)),
                Rule::country_ctx => {
                    expect
                        .context
                        .push(Node::new(ContextWord::Country(value()), word_loc));
                }
                Rule::provider_ctx => {
                    expect
                        .context
                        .push(Node::new(ContextWord::Provider(value()), word_loc));
                }
                Rule::verified_ctx => expect
                    .context
                    .push(Node::new(ContextWord::Verified, word_loc)),
                _ => {}
            }
        }
        Node::new(expect, loc)
    }

    fn assertion(&self, pair: Pair<'_, Rule>) -> Node<AssertDecl> {
        let loc = self.loc(&pair);
        let mut decl = AssertDecl {
            quantifier: Quantifier::Never,
            subjects: Vec::new(),
            targets: Vec::new(),
        };
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::quantifier => {
                    decl.quantifier = if p.as_str() == "only" {
                        Quantifier::Only
                    } else {
                        Quantifier::Never
                    };
                }
                Rule::subjects => decl.subjects = self.subjects(p),
                Rule::targets => decl.targets = self.targets(p),
                _ => {}
            }
        }
        Node::new(decl, loc)
    }

    /// Reads what it can of a statement that does not parse, and reports why it does not. A
    /// declaration whose head reads (`site NAME`, `resource NAME`, `group NAME`, `test "NAME"`)
    /// stays declared, so that every rule naming it resolves instead of adding an "unknown
    /// name" error of its own; the lines of its block are then parsed one by one, so each bad
    /// line gets its own diagnostic and the good ones are kept, and a missing `}` is one more.
    /// Anything else is the statement's one syntax error, and no statement.
    fn recover(
        &self,
        chunk_text: &str,
        error: &pest::error::Error<Rule>,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Option<Statement> {
        let (statement, found) = self.recover_declaration(chunk_text);
        if found.is_empty() {
            // Nothing more precise to say than the statement's own error.
            diagnostics.push(self.syntax_error(error, chunk_text, Context::Statement));
        } else {
            diagnostics.extend(found);
        }
        statement
    }

    /// The declaration a statement begins, with its block read line by line, and the
    /// diagnostics of its lines (none when the head is all that reads).
    fn recover_declaration(&self, chunk_text: &str) -> (Option<Statement>, Vec<Diagnostic>) {
        let mut diagnostics = Vec::new();
        let Some(head) = Grammar::parse(Rule::declaration_head, chunk_text)
            .ok()
            .and_then(|mut pairs| pairs.next())
        else {
            return (None, diagnostics);
        };
        let head_span = head.as_span();
        let end = chunk_text.trim_end().len().max(head_span.end());
        let loc = Loc {
            file: self.file,
            span: Span::new(self.offset + head_span.start(), self.offset + end),
        };
        let mut keyword = Rule::EOI;
        let mut name = Node::new(String::new(), loc);
        for part in head.into_inner() {
            match part.as_rule() {
                Rule::ident => name = self.text(&part),
                Rule::string => name = self.node(&part, unescape(&part)),
                rule => keyword = rule,
            }
        }
        let mut block = match keyword {
            Rule::kw_site => {
                let site = SiteDecl {
                    name,
                    description: None,
                };
                return (Some(Statement::Site(Node::new(site, loc))), diagnostics);
            }
            Rule::kw_resource => Block::Resource(empty_resource(name), PropertyTracker::default()),
            Rule::kw_group => Block::Group(empty_group(name), PropertyTracker::default()),
            _ => Block::Test(TestDecl {
                name,
                steps: Vec::new(),
            }),
        };
        let rest = chunk_text.get(head_span.end()..).unwrap_or("");
        let open = head_span.end() + (rest.len() - rest.trim_start_matches([' ', '\t']).len());
        if !chunk_text.get(open..).unwrap_or("").starts_with('{') {
            // No block to read: the head is all that is known.
            block.mark_partial();
            return (Some(block.into_statement(loc)), diagnostics);
        }
        let scan = scan_block(chunk_text, open + 1);
        for line in &scan.lines {
            let Some(line_text) = chunk_text.get(line.start..line.end) else {
                continue;
            };
            let builder = Builder {
                file: self.file,
                offset: self.offset + line.start,
            };
            match Grammar::parse(block.line_rule(), line_text) {
                Ok(pairs) => {
                    let props = pairs.flat_map(Pair::into_inner);
                    for prop in props.filter(|p| p.as_rule() != Rule::EOI) {
                        block.add(&builder, prop, &mut diagnostics);
                    }
                }
                Err(error) => {
                    let context = Context::Line(block.property_words());
                    diagnostics.push(builder.syntax_error(&error, line_text, context));
                    block.mark_partial();
                }
            }
        }
        match scan.close {
            None => {
                let at = scan.content_end;
                diagnostics.push(
                    Diagnostic::new(
                        Code::Syntax,
                        Loc {
                            file: self.file,
                            span: Span::new(self.offset + at, self.offset + at + 1),
                        },
                        "expected `}`, found the end of the statement",
                    )
                    .with_help("a `{` in this statement is never closed"),
                );
            }
            Some(close) => {
                let after = chunk_text.get(close + 1..).unwrap_or("");
                let content = after.trim_start();
                if !content.is_empty() && !content.starts_with('#') {
                    let at = close + 1 + (after.len() - content.len());
                    let found = found_at(chunk_text, at);
                    diagnostics.push(Diagnostic::new(
                        Code::Syntax,
                        Loc {
                            file: self.file,
                            span: Span::new(
                                self.offset + at,
                                self.offset + at + found.len().max(1),
                            ),
                        },
                        format!("expected the end of the statement, found `{found}`"),
                    ));
                }
            }
        }
        (Some(block.into_statement(loc)), diagnostics)
    }

    fn syntax_error(
        &self,
        error: &pest::error::Error<Rule>,
        chunk_text: &str,
        context: Context,
    ) -> Diagnostic {
        let mut position = match error.location {
            InputLocation::Pos(p) => p,
            InputLocation::Span((start, _)) => start,
        };
        let found = found_at(chunk_text, position);
        let at_start = position == chunk_text.len() - chunk_text.trim_start().len();
        if found.is_empty() {
            // Point at the end of what was written, not at the blank line after it.
            position = position.min(chunk_text.trim_end().len());
        }
        let loc = Loc {
            file: self.file,
            span: Span::new(
                self.offset + position,
                self.offset + position + found.len().max(1),
            ),
        };
        let end_words = match context {
            Context::Statement => "the end of the statement",
            Context::Line(_) => "the end of the line",
        };
        let expected = match &error.variant {
            ErrorVariant::ParsingError { .. }
                if at_start && matches!(context, Context::Statement) =>
            {
                "a statement: `site`, `resource`, `group`, `allow`, `deny`, `test` or `assert`"
                    .to_owned()
            }
            ErrorVariant::ParsingError { positives, .. } => expected_words(positives, end_words),
            ErrorVariant::CustomError { message } => message.clone(),
        };
        let found_words = match found.chars().next() {
            None => end_words.to_owned(),
            Some('\r') => "a carriage return that ends no line (`\\r`)".to_owned(),
            Some(c) if c.is_control() && c != '\t' => {
                format!("the control character U+{:04X}", u32::from(c))
            }
            Some(_) => format!("`{found}`"),
        };
        let diagnostic = Diagnostic::new(
            Code::Syntax,
            loc,
            format!("expected {expected}, found {found_words}"),
        );
        let keywords: &[&str] = match context {
            Context::Statement => &STATEMENT_WORDS,
            Context::Line(words) => words,
        };
        let near_keyword = at_start
            .then(|| crate::did_you_mean(found, keywords.iter().copied()))
            .flatten();
        if let Some(near) = near_keyword {
            return diagnostic.with_help(format!("did you mean `{near}`?"));
        }
        if found.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
            return diagnostic.with_help("names are lowercase: letters, digits, `_` and `-`");
        }
        let opened = chunk_text.matches('{').count();
        if found.is_empty() && opened > chunk_text.matches('}').count() {
            return diagnostic.with_help("a `{` in this statement is never closed");
        }
        diagnostic
    }
}

/// The words that may begin a statement, for "did you mean".
const STATEMENT_WORDS: [&str; 7] = [
    "site", "resource", "group", "allow", "deny", "test", "assert",
];

/// What a syntax error was found in: a whole statement, or one line of a block whose
/// statement did not parse (with the words that may begin such a line).
#[derive(Clone, Copy)]
enum Context {
    Statement,
    Line(&'static [&'static str]),
}

/// A declaration being put together from the lines of its block, for [`Builder::recover`].
enum Block {
    Resource(ResourceDecl, PropertyTracker),
    Group(GroupDecl, PropertyTracker),
    Test(TestDecl),
}

impl Block {
    /// The grammar rule that one line of this block is parsed with.
    fn line_rule(&self) -> Rule {
        match self {
            Block::Resource(..) => Rule::resource_line,
            Block::Group(..) => Rule::group_line,
            Block::Test(_) => Rule::test_line,
        }
    }

    fn property_words(&self) -> &'static [&'static str] {
        match self {
            Block::Resource(..) => &["address", "site", "ports", "description"],
            Block::Group(..) => &["members", "idp", "description"],
            Block::Test(_) => &["given", "expect"],
        }
    }

    fn add(&mut self, builder: &Builder, prop: Pair<'_, Rule>, diagnostics: &mut Vec<Diagnostic>) {
        match self {
            Block::Resource(decl, seen) => builder.resource_prop(decl, seen, prop, diagnostics),
            Block::Group(decl, seen) => builder.group_prop(decl, seen, prop, diagnostics),
            Block::Test(decl) => builder.test_step(decl, prop),
        }
    }

    /// Records that some of the block did not read: a resource then does not count as
    /// missing a property that may stand on an unreadable line.
    fn mark_partial(&mut self) {
        if let Block::Resource(decl, _) = self {
            decl.partial = true;
        }
    }

    fn into_statement(self, loc: Loc) -> Statement {
        match self {
            Block::Resource(decl, _) => Statement::Resource(Node::new(decl, loc)),
            Block::Group(decl, _) => Statement::Group(Node::new(decl, loc)),
            Block::Test(decl) => Statement::Test(Node::new(decl, loc)),
        }
    }
}

fn empty_resource(name: Node<String>) -> ResourceDecl {
    ResourceDecl {
        name,
        address: None,
        site: None,
        ports: None,
        description: None,
        partial: false,
    }
}

fn empty_group(name: Node<String>) -> GroupDecl {
    GroupDecl {
        name,
        members: Vec::new(),
        idp: Vec::new(),
        description: None,
    }
}

/// The lines of a block, from just after its `{`: cut at newlines and `;` outside strings and
/// comments, up to the `}` that closes it (the grammar's block has no nested braces).
struct BlockScan {
    lines: Vec<Chunk>,
    /// Where the closing `}` is, if anywhere.
    close: Option<usize>,
    /// Just after the last character that is neither whitespace nor comment: where a missing
    /// `}` belongs.
    content_end: usize,
}

fn scan_block(text: &str, start: usize) -> BlockScan {
    let mut scan = BlockScan {
        lines: Vec::new(),
        close: None,
        content_end: start,
    };
    let mut line_start = start;
    let mut has_content = false;
    let mut in_string = false;
    let mut in_comment = false;
    let mut escaped = false;
    let push = |lines: &mut Vec<Chunk>, start: usize, end: usize, has_content: bool| {
        if has_content {
            lines.push(Chunk { start, end });
        }
    };
    for (i, c) in text.get(start..).unwrap_or("").char_indices() {
        let i = start + i;
        if c == '\n' {
            // Strings and comments never span lines.
            in_string = false;
            in_comment = false;
            escaped = false;
            push(&mut scan.lines, line_start, i, has_content);
            line_start = i + 1;
            has_content = false;
            continue;
        }
        if in_comment {
            continue;
        }
        if in_string {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => escaped = false,
            }
            scan.content_end = i + c.len_utf8();
            continue;
        }
        match c {
            '#' => {
                in_comment = true;
                continue;
            }
            '"' => in_string = true,
            ';' => {
                push(&mut scan.lines, line_start, i, has_content);
                line_start = i + 1;
                has_content = false;
                continue;
            }
            '}' => {
                push(&mut scan.lines, line_start, i, has_content);
                scan.close = Some(i);
                return scan;
            }
            _ => {}
        }
        if !c.is_whitespace() {
            has_content = true;
            scan.content_end = i + c.len_utf8();
        }
    }
    push(&mut scan.lines, line_start, text.len(), has_content);
    scan
}

/// Catches properties given twice in one block.
#[derive(Default)]
struct PropertyTracker {
    seen: Vec<Rule>,
}

impl PropertyTracker {
    fn note(
        &mut self,
        builder: &Builder,
        prop: &Pair<'_, Rule>,
        diagnostics: &mut Vec<Diagnostic>,
    ) {
        let rule = prop.as_rule();
        if self.seen.contains(&rule) {
            let word = prop.as_str().split_whitespace().next().unwrap_or("");
            diagnostics.push(
                Diagnostic::new(
                    Code::Property,
                    builder.loc(prop),
                    format!("property `{word}` is given twice"),
                )
                .with_help("give each property once; list several ports on one `ports` line"),
            );
        } else {
            self.seen.push(rule);
        }
    }
}

fn effect(pair: &Pair<'_, Rule>) -> Effect {
    if pair.as_str() == "deny" {
        Effect::Deny
    } else {
        Effect::Allow
    }
}

/// The text of a `string` pair without quotes and with `\"` and `\\` resolved.
fn unescape(pair: &Pair<'_, Rule>) -> String {
    let raw = pair.as_str();
    let inner = raw
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(raw);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The token at a position, for "found ..." in messages.
fn found_at(text: &str, position: usize) -> &str {
    let rest = text.get(position..).unwrap_or("");
    let rest = rest.split('\n').next().unwrap_or("");
    let first = rest.chars().next();
    let end = match first {
        None => 0,
        Some(c) if c.is_control() && c != '\t' => c.len_utf8(),
        Some(c) if c.is_alphanumeric() || c == '_' => rest
            .find(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':')))
            .unwrap_or(rest.len()),
        Some('"') => rest
            .get(1..)
            .and_then(|r| r.find('"'))
            .map_or(rest.len(), |i| i + 2),
        Some(c) => c.len_utf8(),
    };
    rest.get(..end).unwrap_or(rest)
}

/// The rules pest expected, in words; `end_words` names `EOI` (the end of the statement, or of
/// the line of a block).
fn expected_words(rules: &[Rule], end_words: &'static str) -> String {
    let mut words: Vec<&str> = rules
        .iter()
        .filter_map(|r| match r {
            Rule::EOI => Some(end_words),
            _ => describe(*r),
        })
        .collect();
    words.sort_unstable();
    words.dedup();
    match words.as_slice() {
        [] => "something else".to_owned(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Grammar rule names in words a user knows.
fn describe(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::ident => "a name such as `engineering`",
        Rule::string | Rule::string_inner => "a quoted string",
        Rule::arrow => "`->`",
        Rule::open => "`{`",
        Rule::close => "`}`",
        Rule::kw_site | Rule::site_decl => "`site`",
        Rule::kw_resource | Rule::resource_decl => "`resource`",
        Rule::kw_group | Rule::group_decl => "`group`",
        Rule::kw_allow | Rule::kw_deny | Rule::effect | Rule::access_rule => "`allow` or `deny`",
        Rule::kw_user | Rule::user_subject => "`user \"EMAIL\"`",
        Rule::kw_when | Rule::when_clause => "`when`",
        Rule::kw_and => "`and`",
        Rule::kw_as | Rule::as_clause => "`as NAME`",
        Rule::kw_in => "`in`",
        Rule::kw_not => "`not`",
        Rule::kw_test | Rule::test_block => "`test`",
        Rule::kw_given | Rule::given => "`given \"EMAIL\" in GROUP`",
        Rule::kw_expect | Rule::expect => "`expect allow|deny \"EMAIL\" -> RESOURCE`",
        Rule::kw_assert | Rule::assertion => "`assert`",
        Rule::kw_never | Rule::kw_only | Rule::quantifier => "`never` or `only`",
        Rule::address_prop => "`address`",
        Rule::internet => "`internet`",
        Rule::site_prop | Rule::site_target => "`site`",
        Rule::ports_prop => "`ports`",
        Rule::description_prop => "`description`",
        Rule::members_prop => "`members`",
        Rule::idp_prop => "`idp`",
        Rule::port_spec | Rule::protocol | Rule::icmp => "a port such as `tcp/443`",
        Rule::port_range | Rule::port_number => {
            "a port number such as `443` or a range such as `8000-8100`"
        }
        Rule::subjects | Rule::subject => "a group name or `user \"EMAIL\"`",
        Rule::targets | Rule::target => "a resource name or `site NAME`",
        Rule::time_cond => "`time`",
        Rule::country_cond | Rule::country_ctx => "`country`",
        Rule::source_cond => "`source`",
        Rule::provider_cond | Rule::provider_ctx => "`provider`",
        Rule::verified_cond => "`client verified`",
        Rule::days | Rule::day_range | Rule::day => "days such as `mon-fri`",
        Rule::window | Rule::clock => "a time window such as `08:00-18:00`",
        Rule::time_zone => "a time zone such as `Europe/Berlin`",
        Rule::country_code => "a country code such as `DE`",
        Rule::network => "an address or range such as `10.0.0.0/8`",
        Rule::at_ctx => "`at`",
        Rule::timestamp => "a timestamp such as `2026-11-26T10:00:00+01:00`",
        Rule::from_ctx => "`from`",
        Rule::verified_ctx => "`verified`",
        Rule::EOI => "the end of the statement",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(text: &str) -> Vec<&str> {
        split_statements(text)
            .iter()
            .map(|c| &text[c.start..c.end])
            .collect()
    }

    #[test]
    fn splits_at_newlines_and_semicolons_outside_blocks_strings_and_comments() {
        assert_eq!(
            chunks("site a; site b\n\nsite c # x; y\n"),
            ["site a", " site b", "site c # x; y"]
        );
        assert_eq!(
            chunks("resource r {\n address \"a;b\"\n}\nsite s"),
            ["resource r {\n address \"a;b\"\n}", "site s"]
        );
    }

    #[test]
    fn rules_go_on_after_commas_and_arrows_and_before_when_and_as() {
        let text = "allow a,\n  b ->\n  c\n  when provider x # note\n  and client verified\n  as r\nsite s";
        assert_eq!(chunks(text).len(), 2);
        assert_eq!(chunks("allow a -> b\nwhen_x"), ["allow a -> b", "when_x"]);
    }

    #[test]
    fn a_missing_brace_ends_at_the_next_statement_keyword() {
        assert_eq!(
            chunks("group g {\n members \"a@b.c\"\nallow g -> r\n"),
            ["group g {\n members \"a@b.c\"", "allow g -> r"]
        );
    }

    /// What a file's recovered declarations hold, and the lines of its diagnostics.
    fn recovered(text: &str) -> (Vec<String>, Vec<usize>) {
        let (policy, diagnostics) = parse_file(FileId(0), text);
        let statements = policy
            .statements
            .iter()
            .map(|statement| match statement {
                Statement::Site(s) => format!("site {}", s.node.name),
                Statement::Resource(r) => {
                    let r = &r.node;
                    let address = match r.address.as_ref().map(|a| &a.node) {
                        Some(AddressText::Quoted(text)) => text.as_str(),
                        Some(AddressText::Internet) => "internet",
                        None => "-",
                    };
                    let site = r.site.as_ref().map_or("-", |s| s.node.as_str());
                    let ports = r.ports.as_ref().map_or(0, Vec::len);
                    let partial = if r.partial { " partial" } else { "" };
                    format!("resource {} {address} {site} {ports}{partial}", r.name)
                }
                Statement::Group(g) => {
                    let g = &g.node;
                    let members: Vec<&str> = g.members.iter().map(|m| m.node.as_str()).collect();
                    format!("group {} {members:?} {}", g.name, g.idp.len())
                }
                Statement::Test(t) => format!("test {} {}", t.node.name, t.node.steps.len()),
                Statement::Rule(_) => "rule".to_owned(),
                Statement::Assert(_) => "assert".to_owned(),
            })
            .collect();
        let lines = diagnostics
            .iter()
            .map(|d| text[..d.loc.span.start as usize].matches('\n').count() + 1)
            .collect();
        (statements, lines)
    }

    #[test]
    fn a_declaration_that_does_not_parse_keeps_what_reads() {
        let cases: [(&str, &[&str], &[usize]); 8] = [
            (
                "resource r {\n address \"a.b.c\"\n ports tcp/1, x\n site s\n}\nallow g -> r",
                &["resource r a.b.c s 0 partial", "rule"],
                &[3],
            ),
            (
                "resource r {\n address \"a.b.c\"\n site s\nallow g -> r",
                &["resource r a.b.c s 0", "rule"],
                &[3],
            ),
            (
                "resource r { adress \"a.b.c\"; site s; ports tcp/1 }",
                &["resource r - s 1 partial"],
                &[1],
            ),
            (
                "resource r address \"a.b.c\"",
                &["resource r - - 0 partial"],
                &[1],
            ),
            (
                "group g {\n members \"a@b.c\", x@y.z\n members \"d@e.f\"\n idp okta \"G\"\n}",
                &["group g [\"d@e.f\"] 1"],
                &[2],
            ),
            (
                "site hq Headquarters\nsite lab",
                &["site hq", "site lab"],
                &[1],
            ),
            (
                "test \"t\" {\n expect allow \"a@b.c\" -> r\n expect maybe \"a@b.c\" -> r\n}",
                &["test t 1"],
                &[3],
            ),
            // No name to keep: one error, nothing declared.
            ("resource R { address \"a.b.c\"; site s }", &[], &[1]),
        ];
        for (text, statements, lines) in cases {
            assert_eq!(
                recovered(text),
                (strings(statements), lines.to_vec()),
                "{text}"
            );
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn block_lines_are_cut_at_newlines_and_semicolons_up_to_the_closing_brace() {
        let text = "{ a \"x;}\" # c; }\n b; c }  tail";
        let scan = scan_block(text, 1);
        let lines: Vec<&str> = scan.lines.iter().map(|c| &text[c.start..c.end]).collect();
        assert_eq!(lines, [" a \"x;}\" # c; }", " b", " c "]);
        assert_eq!(scan.close, Some(text.find(" }  tail").unwrap_or(0) + 1));
        let scan = scan_block("{ a\n b # c\n", 1);
        assert_eq!((scan.close, scan.content_end), (None, 6));
    }
}
