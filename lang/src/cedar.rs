//! The Cedar front end: `*.cedar` files of a policy tree, turned into the same
//! [`RuleDecl`]s that `allow`/`deny` lines make, so that resolving, checking and the decision
//! table treat both languages alike.
//!
//! Cedar itself (the `cedar-policy` crate) parses each policy and reports syntax errors; its
//! public syntax tree (`pst`) gives the meaning. That tree carries no source locations, so a
//! small token scan of the policy text ([`Layout`], [`Shape`]) finds where the scope, the
//! annotations and the `when`/`unless` clauses are, and mirrors the `&&`/`||`/`!` structure of
//! each clause, so that a diagnostic can point at the sub-expression it is about. Where the scan
//! and Cedar's tree disagree, the enclosing clause (or policy) is pointed at instead: a location
//! may be coarser, never in another policy. Cedar types never leave this module.
//!
//! What maps (everything else is an `E017` error that points at it; nothing is dropped):
//! - `permit` / `forbid`: allow / deny; `@id("name")`: the rule's name.
//! - principal: unconstrained (group `everyone`), `== User::"EMAIL"`, `in Group::"ID"`
//!   (and `in User::"EMAIL"`, which Cedar's reflexive `in` makes the same user).
//! - action: unconstrained, `== Action::"connect"`, `in [Action::"connect"]`.
//! - resource: `== Resource::"ID"` (or `in Resource::"ID"`), `in Site::"ID"`.
//! - the same tests in a `when`, where `principal in [..]` / `resource in [..]` and `||` of
//!   such tests list several subjects or targets; the principal and the resource are each
//!   constrained in one place (scope or `when`), since a rule cannot intersect two lists.
//! - conditions: `&&` of tests of `context.country`, `context.source_ip`,
//!   `context.provider` and `context.client_verified`; `!`, `!=` and `unless` negate where the
//!   fz condition can be negated (country, source); `||` joins tests of one of country or
//!   source; a negated `||` of one fact becomes one negated condition.
//!
//! Sound means: with a complete context (every key present), no accepted policy can error in
//! Cedar's evaluator, since Cedar skips a policy that errors and a `forbid` would fail open.
//! Every accepted construct is total on well-typed input; `compiler/tests/differential.rs`
//! checks the decisions against cedar-policy itself.

mod clock;

use std::error::Error as _;
use std::ops::Range;
use std::str::FromStr;

use cedar_policy::pst::{
    ActionConstraint, BinaryOp, Clause, Effect as CedarEffect, EntityOrSlot, EntityUID, Expr,
    Literal, PrincipalConstraint, ResourceConstraint, Template, UnaryOp, Var,
};
use cedar_policy::{PolicyId, PolicySet, RestrictedExpression};
use miette::Diagnostic as _;

use crate::ast::{
    Condition, DayRange, Effect, PolicyFile, RuleDecl, RuleTarget, Statement, Subject, Target,
    Window,
};
use crate::diagnostic::{Code, Diagnostic};
use crate::source::{FileId, Loc, Node, Span};
use clock::{ClockClause, ClockTest};

/// The one action of the fz entity model.
const ACTION: &str = "connect";

/// What `help` says for a principal that is not understood.
const PRINCIPAL_HELP: &str = "the principal is unconstrained, `principal == User::\"EMAIL\"` or \
    `principal in Group::\"ID\"`; `when { principal in [Group::\"ID\", User::\"EMAIL\"] }` \
    lists several";

/// What `help` says for a resource that is not understood.
const RESOURCE_HELP: &str = "write `resource == Resource::\"ID\"` or `resource in Site::\"ID\"`; \
    `when { resource in [Resource::\"ID\", Site::\"ID\"] }` lists several";

/// What `help` says for a condition that is not understood.
const CONDITION_HELP: &str = "conditions can test `context.country == \"DE\"`, \
    `[\"DE\", \"FR\"].contains(context.country)`, \
    `context.source_ip.isInRange(ip(\"10.0.0.0/8\"))`, `context.provider == \"okta\"`, \
    `context.client_verified` and a zone's clock, `context.time[\"Europe/Berlin\"].minute >= 480`, \
    joined with `&&`";

/// Parses one `.cedar` file: every policy becomes a [`Statement::Rule`]. A policy that does not
/// parse, or that uses a construct a decision table cannot hold, gets diagnostics and no rule;
/// the other policies are returned either way.
pub fn parse_cedar_file(file: FileId, text: &str) -> (PolicyFile, Vec<Diagnostic>) {
    let tokens = lex(text);
    let mut policy = PolicyFile::default();
    let mut diagnostics = Vec::new();
    let chunks = split_policies(text, &tokens);
    // A file that parses whole is parsed once (Cedar's `to_pst` parses each policy's text
    // again, so this saves one of two parses per policy); a file with errors is parsed policy
    // by policy, to find and place every error.
    let mut parsed = parse_whole(text)
        .filter(|templates| templates.len() == chunks.len())
        .map(Vec::into_iter);
    for chunk in chunks {
        let Some(chunk_tokens) = tokens.get(chunk) else {
            continue;
        };
        let (Some(first), Some(last)) = (chunk_tokens.first(), chunk_tokens.last()) else {
            continue;
        };
        let span = Span::new(first.start, last.end);
        let Some(chunk_text) = text.get(first.start..last.end) else {
            continue;
        };
        let lowering = Lowering {
            file,
            text,
            tokens: chunk_tokens,
            span,
            diagnostics: &mut diagnostics,
            failed: false,
            subjects: None,
            targets: None,
        };
        let template = parsed.as_mut().and_then(Iterator::next);
        if let Some(rule) = lowering.policy(chunk_text, template) {
            policy
                .statements
                .push(Statement::Rule(Node::new(rule, loc(file, span))));
        }
    }
    (policy, diagnostics)
}

fn loc(file: FileId, span: Span) -> Loc {
    Loc { file, span }
}

/// Turns one policy (its text and tokens) into a rule, reporting what does not fit.
struct Lowering<'a> {
    file: FileId,
    /// The whole file.
    text: &'a str,
    /// The policy's tokens, with file offsets.
    tokens: &'a [Token<'a>],
    /// The whole policy, annotations to `;`.
    span: Span,
    diagnostics: &'a mut Vec<Diagnostic>,
    /// Whether an `E017` was reported for this policy.
    failed: bool,
    /// Who the policy is about, once the scope or a `when` test constrains the principal.
    subjects: Option<Vec<Node<Subject>>>,
    /// What the policy is about, once the scope or a `when` test constrains the resource.
    targets: Option<Vec<Node<RuleTarget>>>,
}

impl Lowering<'_> {
    /// Lowers the policy of this chunk, `parsed` when the whole file was parsed at once.
    fn policy(mut self, chunk_text: &str, parsed: Option<Template>) -> Option<RuleDecl> {
        let template = match parsed {
            Some(template) => template,
            None => {
                let templates = match PolicySet::from_str(chunk_text) {
                    Ok(set) => self.templates(&set),
                    Err(errors) => {
                        for error in errors.iter() {
                            self.syntax_error(error);
                        }
                        return None;
                    }
                };
                // INVARIANT: a chunk holds at most one policy: it ends at the first `;`
                // outside brackets, and Cedar requires a `;` after each policy.
                templates.into_iter().next()?
            }
        };
        let layout = Layout::new(self.tokens);
        let rule = self.rule(&template, &layout);
        if self.failed { None } else { rule }
    }

    /// The policy's syntax tree, whether it is a static policy or a template with slots.
    fn templates(&mut self, set: &PolicySet) -> Vec<Template> {
        let mut templates = Vec::new();
        for policy in set.policies() {
            match policy.to_pst() {
                Ok(pst) => templates.push(pst.body().clone()),
                Err(error) => {
                    self.unsupported(self.span, lowercase_first(&error.to_string()), None, None)
                }
            }
        }
        for template in set.templates() {
            match template.to_pst() {
                Ok(pst) => templates.push(pst),
                Err(error) => {
                    self.unsupported(self.span, lowercase_first(&error.to_string()), None, None)
                }
            }
        }
        templates
    }

    fn rule(&mut self, template: &Template, layout: &Layout) -> Option<RuleDecl> {
        let scope = |i: usize| {
            layout
                .scope
                .get(i)
                .and_then(|range| self.range_span(range.clone()))
                .unwrap_or(self.span)
        };
        let (principal_span, action_span, resource_span) = (scope(0), scope(1), scope(2));
        self.principal(&template.principal, principal_span);
        self.action(&template.action, action_span);
        self.resource(&template.resource, resource_span);

        let mut conditions = Vec::new();
        let clauses = template.clauses();
        let located = layout.clauses.len() == clauses.len();
        for (i, clause) in clauses.iter().enumerate() {
            let body = located
                .then(|| layout.clauses.get(i))
                .flatten()
                .and_then(|range| self.tokens.get(range.clone()));
            let shape = body.and_then(Shape::new);
            let fallback = body
                .and_then(|tokens| token_span(tokens))
                .unwrap_or(self.span);
            let (expr, positive) = match clause {
                Clause::When(expr) => (expr, true),
                Clause::Unless(expr) => (expr, false),
            };
            self.condition(expr, shape.as_ref(), fallback, positive, &mut conditions);
        }

        let name = template.annotations.get("id").map(|value| {
            let span = layout
                .id_value
                .and_then(|i| self.tokens.get(i))
                .map_or(self.span, Token::span);
            if !is_fz_name(value) {
                self.unsupported(
                    span,
                    format!("rule name `{value}` is not an fz name"),
                    Some("from this `@id`"),
                    Some(
                        "rule names are lowercase letters, digits, `_` and `-`, starting with a \
                         letter, as in `as NAME`",
                    ),
                );
            }
            Node::new(value.to_string(), loc(self.file, span))
        });
        let effect = match template.effect {
            CedarEffect::Permit => Effect::Allow,
            CedarEffect::Forbid => Effect::Deny,
        };
        // An unconstrained principal is everyone; an unconstrained resource has no table row.
        let subjects = self.subjects.take().unwrap_or_else(|| {
            let everyone = Subject::Group("everyone".to_owned());
            vec![Node::new(everyone, loc(self.file, principal_span))]
        });
        let Some(targets) = self.targets.take() else {
            if !matches!(template.resource, ResourceConstraint::Any) {
                return None; // The scope's refusal is reported.
            }
            return self.refuse(
                resource_span,
                "a policy must name a resource or a site",
                Some("the decision table is per resource"),
                Some(RESOURCE_HELP),
            );
        };
        Some(RuleDecl {
            effect,
            subjects,
            targets,
            conditions,
            name,
            normalized_text: normalize(
                self.text
                    .get(self.span.start as usize..self.span.end as usize)?,
            ),
        })
    }

    fn principal(&mut self, constraint: &PrincipalConstraint, span: Span) {
        let subject = match constraint {
            PrincipalConstraint::Any => return,
            PrincipalConstraint::Eq(EntityOrSlot::Entity(uid)) => {
                let at = self.literal(uid.eid.as_ref(), span).loc.span;
                self.principal_entity(Relation::Eq, uid, span, at)
            }
            PrincipalConstraint::In(EntityOrSlot::Entity(uid)) => {
                let at = self.literal(uid.eid.as_ref(), span).loc.span;
                self.principal_entity(Relation::In, uid, span, at)
            }
            PrincipalConstraint::Eq(EntityOrSlot::Slot(_))
            | PrincipalConstraint::In(EntityOrSlot::Slot(_))
            | PrincipalConstraint::IsIn(_, EntityOrSlot::Slot(_)) => {
                self.template_slot(span, "principal")
            }
            PrincipalConstraint::Is(_) | PrincipalConstraint::IsIn(..) => self.refuse(
                span,
                format!(
                    "`{}` cannot be compiled into a decision table",
                    self.excerpt(span)
                ),
                Some("`is` is not supported"),
                Some(PRINCIPAL_HELP),
            ),
        };
        if let Some(subject) = subject {
            self.constrain(Scope::Principals(vec![subject]), span);
        }
    }

    /// `principal == UID` or `principal in UID` as a subject, located at `at`; `span` is the
    /// whole test, for the diagnostics.
    fn principal_entity(
        &mut self,
        relation: Relation,
        uid: &EntityUID,
        span: Span,
        at: Span,
    ) -> Option<Node<Subject>> {
        let subject = match relation {
            // Cedar's `in` is reflexive, and no entity is below a user.
            Relation::Eq | Relation::In if is_type(uid, "User") => {
                let email = uid.eid.to_string();
                if email != email.to_lowercase() {
                    let help = format!(
                        "write `User::\"{}\"`: the portal names users by their lowercase email",
                        email.to_lowercase()
                    );
                    return self.refuse(
                        span,
                        format!("`{uid}` never matches: Cedar compares entity ids exactly"),
                        Some("an email with capitals"),
                        Some(&help),
                    );
                }
                Subject::User(email)
            }
            Relation::In if is_type(uid, "Group") => Subject::Group(uid.eid.to_string()),
            Relation::Eq if is_type(uid, "Group") => {
                let help = format!("write `principal in {uid}` for the members of the group");
                return self.refuse(
                    span,
                    format!("`principal == {uid}` never holds: the principal is a user"),
                    Some("a user is never equal to a group"),
                    Some(&help),
                );
            }
            Relation::Eq | Relation::In => {
                return self.refuse(
                    span,
                    format!("unknown principal type `{}`", uid.ty),
                    Some("principals are `User`s and `Group`s"),
                    Some(PRINCIPAL_HELP),
                );
            }
        };
        Some(Node::new(subject, loc(self.file, at)))
    }

    fn action(&mut self, constraint: &ActionConstraint, span: Span) {
        let ok = match constraint {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(uid) => is_connect(uid),
            ActionConstraint::In(uids) => !uids.is_empty() && uids.iter().all(is_connect),
        };
        if !ok {
            self.unsupported(
                span,
                format!(
                    "`{}` names an action other than `connect`",
                    self.excerpt(span)
                ),
                Some("the only action is `Action::\"connect\"`"),
                Some("leave the action unconstrained or write `action == Action::\"connect\"`"),
            );
        }
    }

    fn resource(&mut self, constraint: &ResourceConstraint, span: Span) {
        let target = match constraint {
            // Checked once the conditions are known: a `when` may name the resource instead.
            ResourceConstraint::Any => return,
            ResourceConstraint::Eq(EntityOrSlot::Entity(uid)) => {
                let at = self.literal(uid.eid.as_ref(), span).loc.span;
                self.resource_entity(Relation::Eq, uid, span, at)
            }
            ResourceConstraint::In(EntityOrSlot::Entity(uid)) => {
                let at = self.literal(uid.eid.as_ref(), span).loc.span;
                self.resource_entity(Relation::In, uid, span, at)
            }
            ResourceConstraint::Eq(EntityOrSlot::Slot(_))
            | ResourceConstraint::In(EntityOrSlot::Slot(_))
            | ResourceConstraint::IsIn(_, EntityOrSlot::Slot(_)) => {
                self.template_slot(span, "resource")
            }
            ResourceConstraint::Is(_) | ResourceConstraint::IsIn(..) => self.refuse(
                span,
                format!(
                    "`{}` cannot be compiled into a decision table",
                    self.excerpt(span)
                ),
                Some("`is` is not supported"),
                Some(RESOURCE_HELP),
            ),
        };
        if let Some(target) = target {
            self.constrain(Scope::Resources(vec![target]), span);
        }
    }

    /// `resource == UID` or `resource in UID` as a target, located at `at`; `span` is the whole
    /// test, for the diagnostics. Cedar's `in` follows the entity hierarchy, where a resource is
    /// `in` every resource it lies inside (and, through them, in their sites): it reaches the
    /// resources inside the target too, and `==` names the resource alone.
    fn resource_entity(
        &mut self,
        relation: Relation,
        uid: &EntityUID,
        span: Span,
        at: Span,
    ) -> Option<Node<RuleTarget>> {
        let target = match relation {
            // `in` is reflexive; it also reaches the resources inside this one.
            Relation::Eq | Relation::In if is_type(uid, "Resource") => {
                Target::Resource(uid.eid.to_string())
            }
            Relation::In if is_type(uid, "Site") => Target::Site(uid.eid.to_string()),
            Relation::Eq if is_type(uid, "Site") => {
                let help = format!("write `resource in {uid}` for every resource of the site");
                return self.refuse(
                    span,
                    format!("`resource == {uid}` never holds: a resource is in a site"),
                    Some("a resource is never equal to a site"),
                    Some(&help),
                );
            }
            Relation::Eq | Relation::In => {
                return self.refuse(
                    span,
                    format!("unknown resource type `{}`", uid.ty),
                    Some("resources are `Resource`s, in `Site`s"),
                    Some(RESOURCE_HELP),
                );
            }
        };
        let target = RuleTarget {
            target,
            covers_inside: matches!(relation, Relation::In),
        };
        Some(Node::new(target, loc(self.file, at)))
    }

    /// Records who or what the policy is about. fz rules name their subjects and targets once,
    /// so a second constraint (which Cedar would intersect with the first) is refused.
    fn constrain(&mut self, scope: Scope, span: Span) {
        let (first, what) = match scope {
            Scope::Principals(subjects) => (set_once(&mut self.subjects, subjects), "principal"),
            Scope::Resources(targets) => (set_once(&mut self.targets, targets), "resource"),
        };
        if !first {
            let help = format!(
                "constrain the {what} in one place; `{what} in [..]` in a `when` lists \
                 alternatives"
            );
            self.unsupported(
                span,
                format!("the {what} is constrained twice"),
                Some("fz cannot intersect two constraints"),
                Some(&help),
            );
        }
    }

    fn template_slot<T>(&mut self, span: Span, slot: &str) -> Option<T> {
        self.refuse(
            span,
            format!("templates cannot be compiled into a decision table: `?{slot}` has no value"),
            Some("a template slot"),
            Some("write the entity in the policy itself"),
        )
    }

    /// Lowers one clause body (or a part of it) into conditions that must all hold.
    /// `positive` is false under an odd number of negations (`unless`, `!`).
    fn condition(
        &mut self,
        expr: &Expr,
        shape: Option<&Shape>,
        fallback: Span,
        positive: bool,
        out: &mut Vec<Node<Condition>>,
    ) {
        let span = shape.map_or(fallback, |s| s.span);
        match expr {
            Expr::BinaryOp {
                op: BinaryOp::And, ..
            } if positive => {
                let parts = flatten(expr, BinaryOp::And);
                let shapes = shape.and_then(|s| s.children(BinaryOp::And, parts.len()));
                // Tests of one zone's clock make one window together.
                let mut clocks: Vec<(ClockClause, Span)> = Vec::new();
                for (i, part) in parts.iter().enumerate() {
                    let part_shape = shapes.and_then(|s| s.get(i));
                    let part_span = part_shape.map_or(span, |s| s.span);
                    match clock::clock_atom(part) {
                        Some(Ok(test)) => {
                            match clocks.iter_mut().find(|(c, _)| c.zone == test.zone) {
                                Some((clause, at)) => {
                                    clause.add(test.bound);
                                    *at = Span::new(
                                        at.start.min(part_span.start) as usize,
                                        at.end.max(part_span.end) as usize,
                                    );
                                }
                                None => clocks.push((ClockClause::new(test), part_span)),
                            }
                        }
                        Some(Err(refused)) => self.refuse_clock(refused, part_span),
                        None => self.condition(part, part_shape, span, positive, out),
                    }
                }
                for (clause, at) in clocks {
                    self.time(&[clause], at, out);
                }
            }
            Expr::BinaryOp {
                op: BinaryOp::And, ..
            } if clock_clauses(&[expr]).is_some() => self.unsupported(
                span,
                "a time window cannot be negated",
                Some("negated time window"),
                Some("write the windows in which the policy applies"),
            ),
            Expr::BinaryOp {
                op: BinaryOp::And, ..
            } => self.unsupported(
                span,
                format!(
                    "`{}` cannot be compiled into a decision table",
                    self.excerpt(span)
                ),
                Some("negated, this `&&` is an `||` of negations"),
                Some("write one policy for each negated part, each with its own `unless`"),
            ),
            Expr::BinaryOp {
                op: BinaryOp::Or, ..
            } => {
                let parts = flatten(expr, BinaryOp::Or);
                let shapes = shape.and_then(|s| s.children(BinaryOp::Or, parts.len()));
                if positive {
                    self.disjunction(&parts, shapes, span, out);
                } else if let Some(fact) = self.same_fact(&parts, span) {
                    // Not (country a or country b) is country not in a, b.
                    self.apply(fact, false, span, out);
                } else {
                    // Not (a or b) is (not a) and (not b).
                    for (i, part) in parts.iter().enumerate() {
                        let part_shape = shapes.and_then(|s| s.get(i));
                        self.condition(part, part_shape, span, positive, out);
                    }
                }
            }
            Expr::UnaryOp {
                op: UnaryOp::Not,
                expr: inner,
            } => {
                // A negated test is located with its `!`; a negated `&&` or `||` by its parts.
                let inner_shape = match shape {
                    Some(Shape {
                        kind: ShapeKind::Not(inner_shape),
                        ..
                    }) if !matches!(inner_shape.kind, ShapeKind::Atom) => Some(&**inner_shape),
                    _ => None,
                };
                self.condition(inner, inner_shape, span, !positive, out);
            }
            // `when { true }` and `unless { false }` say nothing.
            Expr::Literal(Literal::Bool(value)) if *value == positive => {}
            Expr::Literal(Literal::Bool(_)) => self.unsupported(
                span,
                "this condition never holds, so the policy never applies",
                Some("always false here"),
                Some("delete the policy"),
            ),
            _ => match self.test(expr, span) {
                Test::Fact(fact, negated) => self.apply(fact, positive != negated, span, out),
                Test::Clock(test) => {
                    let bound = if positive {
                        test.bound
                    } else {
                        test.bound.negate()
                    };
                    let test = ClockTest { bound, ..test };
                    self.time(&[ClockClause::new(test)], span, out);
                }
                Test::Scope(scope) if positive => self.constrain(scope, span),
                Test::Scope(_) => self.unsupported(
                    span,
                    format!(
                        "`{}` cannot be compiled into a decision table",
                        self.excerpt(span)
                    ),
                    Some("negated: fz cannot leave principals or resources out of a rule"),
                    Some("write a `forbid` policy for what is to be left out"),
                ),
                Test::Refused => {}
                Test::Unknown => self.unsupported(
                    span,
                    format!(
                        "`{}` cannot be compiled into a decision table",
                        self.excerpt(span)
                    ),
                    Some("not a condition fz can evaluate"),
                    Some(CONDITION_HELP),
                ),
            },
        }
    }

    /// `a || b || ...` that must hold: one fz condition when every part tests the country, or
    /// every part tests the source address; one list of subjects (or targets) when every part
    /// tests the principal (or the resource).
    fn disjunction(
        &mut self,
        parts: &[&Expr],
        shapes: Option<&[Shape]>,
        span: Span,
        out: &mut Vec<Node<Condition>>,
    ) {
        if let Some(clauses) = clock_clauses(parts) {
            match clauses {
                Ok(clauses) => self.time(&clauses, span, out),
                Err(refused) => self.refuse_clock(refused, span),
            }
            return;
        }
        let mut codes = Vec::new();
        let mut networks = Vec::new();
        let mut subjects = Vec::new();
        let mut targets = Vec::new();
        let mut other = false;
        for (i, part) in parts.iter().enumerate() {
            let part_span = shapes.and_then(|s| s.get(i)).map_or(span, |s| s.span);
            match self.test(part, part_span) {
                Test::Fact(Fact::Country(c), false) => codes.extend(c),
                Test::Fact(Fact::Source(n), false) => networks.extend(n),
                Test::Scope(Scope::Principals(s)) => subjects.extend(s),
                Test::Scope(Scope::Resources(t)) => targets.extend(t),
                // Its diagnostic is out; one is enough.
                Test::Refused => return,
                Test::Fact(..) | Test::Clock(_) | Test::Unknown => other = true,
            }
        }
        let kinds = [codes.len(), networks.len(), subjects.len(), targets.len()];
        if other || kinds.iter().filter(|n| **n > 0).count() != 1 {
            return self.unsupported(
                span,
                format!(
                    "`{}` cannot be compiled into a decision table",
                    self.excerpt(span)
                ),
                Some("`||` between different facts"),
                Some(
                    "`||` can join tests of `context.country`, tests of `context.source_ip`, \
                     tests of the principal or tests of the resource; write one policy for \
                     each alternative",
                ),
            );
        }
        if !subjects.is_empty() {
            self.constrain(Scope::Principals(subjects), span);
        } else if !targets.is_empty() {
            self.constrain(Scope::Resources(targets), span);
        } else if !codes.is_empty() {
            self.apply(Fact::Country(codes), true, span, out);
        } else {
            self.apply(Fact::Source(networks), true, span, out);
        }
    }

    /// Clauses of one zone's clock as an fz `time` condition.
    fn time(&mut self, clauses: &[ClockClause], span: Span, out: &mut Vec<Node<Condition>>) {
        let window = match clock::time_condition(clauses) {
            Ok(window) => window,
            Err(refused) => return self.refuse_clock(refused, span),
        };
        let at = loc(self.file, span);
        let days = clock::DAYS
            .iter()
            .enumerate()
            .filter(|(i, _)| window.days & (1 << i) != 0)
            .map(|(_, day)| {
                let range = DayRange {
                    first: (*day).to_owned(),
                    last: None,
                };
                Node::new(range, at)
            })
            .collect();
        let windows = window
            .windows
            .iter()
            .map(|(start, end)| {
                let window = Window {
                    start: clock::clock_text(*start),
                    end: clock::clock_text(*end),
                };
                Node::new(window, at)
            })
            .collect();
        let zone = self.literal(&window.zone, span);
        let condition = Condition::Time {
            days,
            windows,
            zone,
        };
        out.push(Node::new(condition, at));
    }

    fn refuse_clock(&mut self, refused: clock::Refusal, span: Span) {
        self.unsupported(
            span,
            refused.message,
            Some(refused.label),
            Some(refused.help),
        );
    }

    /// The one fact that parts of an `||` all test, positively: every country, or every source
    /// address. Reports nothing.
    fn same_fact(&self, parts: &[&Expr], span: Span) -> Option<Fact> {
        let mut codes = Vec::new();
        let mut networks = Vec::new();
        for part in parts {
            match self.fact(part, span)? {
                (Fact::Country(c), false) => codes.extend(c),
                (Fact::Source(n), false) => networks.extend(n),
                _ => return None,
            }
        }
        match (codes.is_empty(), networks.is_empty()) {
            (false, true) => Some(Fact::Country(codes)),
            (true, false) => Some(Fact::Source(networks)),
            _ => None,
        }
    }

    /// What one test (no `&&`, `||` or `!` at its top) says.
    fn test(&mut self, expr: &Expr, span: Span) -> Test {
        match clock::clock_test(expr) {
            Some(Ok(test)) => return Test::Clock(test),
            Some(Err(refused)) => {
                self.refuse_clock(refused, span);
                return Test::Refused;
            }
            None => {}
        }
        if let Some(test) = self.scope_test(expr, span) {
            return test;
        }
        match self.fact(expr, span) {
            Some((fact, negated)) => Test::Fact(fact, negated),
            None => Test::Unknown,
        }
    }

    /// `principal == E`, `principal in E`, `principal in [E, ..]`, and the same of `resource`:
    /// the subjects or targets they admit. `None` for any other expression.
    fn scope_test(&mut self, expr: &Expr, span: Span) -> Option<Test> {
        let Expr::BinaryOp { op, left, right } = expr else {
            return None;
        };
        let (var, relation, entities) = match (op, &**left, &**right) {
            (BinaryOp::Eq, Expr::Var(var), Expr::Literal(Literal::EntityUID(uid)))
            | (BinaryOp::Eq, Expr::Literal(Literal::EntityUID(uid)), Expr::Var(var)) => {
                (var, Relation::Eq, vec![uid])
            }
            (BinaryOp::In, Expr::Var(var), Expr::Literal(Literal::EntityUID(uid))) => {
                (var, Relation::In, vec![uid])
            }
            (BinaryOp::In, Expr::Var(var), Expr::Set(elements)) => {
                let uids = elements
                    .iter()
                    .map(|e| match &**e {
                        Expr::Literal(Literal::EntityUID(uid)) => Some(uid),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>();
                match uids {
                    Some(uids) => (var, Relation::In, uids),
                    None => return Some(Test::Unknown),
                }
            }
            _ => return None,
        };
        let principal = match var {
            Var::Principal => true,
            Var::Resource => false,
            Var::Action | Var::Context => return Some(Test::Unknown),
        };
        if entities.is_empty() {
            self.unsupported(
                span,
                format!("`{}` never holds: the list is empty", self.excerpt(span)),
                Some("always false here"),
                Some("delete the policy"),
            );
            return Some(Test::Refused);
        }
        let mut refused = false;
        let mut subjects = Vec::new();
        let mut targets = Vec::new();
        for uid in entities {
            let at = self.literal(uid.eid.as_ref(), span).loc.span;
            if principal {
                match self.principal_entity(relation, uid, span, at) {
                    Some(subject) => subjects.push(subject),
                    None => refused = true,
                }
            } else {
                match self.resource_entity(relation, uid, span, at) {
                    Some(target) => targets.push(target),
                    None => refused = true,
                }
            }
        }
        Some(if refused {
            Test::Refused
        } else if principal {
            Test::Scope(Scope::Principals(subjects))
        } else {
            Test::Scope(Scope::Resources(targets))
        })
    }

    /// A fact that holds (`positive`) or does not hold, as an fz condition.
    fn apply(&mut self, fact: Fact, positive: bool, span: Span, out: &mut Vec<Node<Condition>>) {
        if !self.cedar_evaluates(&fact) {
            return;
        }
        let condition = match fact {
            Fact::Country(codes) => Condition::Country {
                negated: !positive,
                codes,
            },
            Fact::Source(networks) => Condition::Source {
                negated: !positive,
                networks,
            },
            Fact::Provider(provider) if positive && !is_fz_name(&provider.node) => {
                return self.unsupported(
                    provider.loc.span,
                    format!("provider `{}` is not an fz provider id", provider.node),
                    Some("never equal to the provider a user signed in with"),
                    Some("provider ids are lowercase, as in `context.provider == \"okta\"`"),
                );
            }
            Fact::Provider(provider) if positive => Condition::Provider(provider),
            Fact::Verified if positive => Condition::ClientVerified,
            Fact::Provider(_) => {
                return self.unsupported(
                    span,
                    format!(
                        "`{}` cannot be compiled into a decision table",
                        self.excerpt(span)
                    ),
                    Some("negated: fz can require a provider, not exclude one"),
                    Some("name the provider that is required: `context.provider == \"okta\"`"),
                );
            }
            Fact::Verified => {
                return self.unsupported(
                    span,
                    format!(
                        "`{}` cannot be compiled into a decision table",
                        self.excerpt(span)
                    ),
                    Some("negated: fz can require a verified client, not an unverified one"),
                    Some("require `context.client_verified` or leave it out"),
                );
            }
        };
        out.push(Node::new(condition, loc(self.file, span)));
    }

    /// Whether Cedar evaluates the literals of a fact as fz reads them; reports those it does
    /// not. Cedar parses `ip("..")` without checking the text and fails when it evaluates the
    /// policy, and a policy that fails is skipped: a `forbid` would not apply. A country code
    /// in lowercase never equals the portal's uppercase code in Cedar, where fz would read it.
    fn cedar_evaluates(&mut self, fact: &Fact) -> bool {
        let mut ok = true;
        match fact {
            Fact::Source(networks) => {
                for network in networks {
                    let value = RestrictedExpression::new_ip(network.node.as_str());
                    if let Err(error) = cedar_policy::Context::from_pairs([("ip".into(), value)]) {
                        let reason = error.source().map_or(error.to_string(), |e| e.to_string());
                        let refusal = self
                            .refusal(
                                network.loc.span,
                                format!("Cedar cannot evaluate `ip(\"{}\")`", network.node),
                                Some("Cedar skips a policy whose evaluation fails"),
                                Some(
                                    "write a range Cedar reads, such as `10.0.0.0/8` or `fd00::/8`",
                                ),
                            )
                            .with_note(format!("Cedar says: {}", lowercase_first(&reason)));
                        self.report(refusal);
                        ok = false;
                    }
                }
            }
            Fact::Country(codes) => {
                for code in codes
                    .iter()
                    .filter(|c| c.node != c.node.to_ascii_uppercase())
                {
                    self.unsupported(
                        code.loc.span,
                        format!("country `{}` never equals `context.country`", code.node),
                        Some("Cedar compares strings exactly"),
                        Some(&format!(
                            "the portal gives uppercase ISO 3166 codes: write `\"{}\"`",
                            code.node.to_ascii_uppercase()
                        )),
                    );
                    ok = false;
                }
            }
            Fact::Provider(_) | Fact::Verified => {}
        }
        ok
    }

    /// What a test of the context says, and whether it is negated (`!=`, `== false`).
    fn fact(&self, expr: &Expr, span: Span) -> Option<(Fact, bool)> {
        match expr {
            Expr::BinaryOp {
                op: op @ (BinaryOp::Eq | BinaryOp::NotEq),
                left,
                right,
            } => {
                let (key, value) = match (context_key(left), context_key(right)) {
                    (Some(key), None) => (key, &**right),
                    (None, Some(key)) => (key, &**left),
                    _ => return None,
                };
                let negated = *op == BinaryOp::NotEq;
                let fact = match (key, value) {
                    ("country", Expr::Literal(Literal::String(code))) => {
                        Fact::Country(vec![self.literal(code, span)])
                    }
                    ("provider", Expr::Literal(Literal::String(provider))) => {
                        Fact::Provider(self.literal(provider, span))
                    }
                    ("client_verified", Expr::Literal(Literal::Bool(value))) => {
                        return Some((Fact::Verified, negated == *value));
                    }
                    _ => return None,
                };
                Some((fact, negated))
            }
            Expr::BinaryOp {
                op: BinaryOp::Contains,
                left,
                right,
            } if context_key(right) == Some("country") => {
                Some((Fact::Country(self.codes(left, span)?), false))
            }
            // `[context.country].containsAny(["DE", "FR"])`, either way round.
            Expr::BinaryOp {
                op: BinaryOp::ContainsAny,
                left,
                right,
            } => {
                let is_country = |e: &Expr| {
                    matches!(e, Expr::Set(elements)
                        if elements.len() == 1
                            && elements.first().and_then(|e| context_key(e)) == Some("country"))
                };
                let list = match (is_country(left), is_country(right)) {
                    (true, false) => right,
                    (false, true) => left,
                    _ => return None,
                };
                Some((Fact::Country(self.codes(list, span)?), false))
            }
            Expr::BinaryOp {
                op: BinaryOp::IsInRange,
                left,
                right,
            } if context_key(left) == Some("source_ip") => match &**right {
                Expr::UnaryOp {
                    op: UnaryOp::Ip,
                    expr: network,
                } => match &**network {
                    Expr::Literal(Literal::String(network)) => {
                        Some((Fact::Source(vec![self.literal(network, span)]), false))
                    }
                    _ => None,
                },
                _ => None,
            },
            _ if context_key(expr) == Some("client_verified") => Some((Fact::Verified, false)),
            _ => None,
        }
    }

    /// A non-empty set of string literals, as country codes.
    fn codes(&self, set: &Expr, span: Span) -> Option<Vec<Node<String>>> {
        let Expr::Set(elements) = set else {
            return None;
        };
        let codes = elements
            .iter()
            .map(|e| match &**e {
                Expr::Literal(Literal::String(code)) => Some(self.literal(code, span)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        (!codes.is_empty()).then_some(codes)
    }

    /// A string literal as a node, located at its token inside `within` when it can be found.
    fn literal(&self, value: &str, within: Span) -> Node<String> {
        let span = self
            .tokens
            .iter()
            .filter(|t| t.kind == TokenKind::Str)
            .filter(|t| t.start >= within.start as usize && t.end <= within.end as usize)
            .find(|t| t.text.get(1..t.text.len().saturating_sub(1)) == Some(value))
            .map_or(within, Token::span);
        Node::new(value.to_owned(), loc(self.file, span))
    }

    fn syntax_error(&mut self, error: &cedar_policy::ParseError) {
        let label = error.labels().and_then(|labels| {
            let labels: Vec<_> = labels.collect();
            let primary = labels.iter().position(|l| l.primary()).unwrap_or(0);
            labels.into_iter().nth(primary)
        });
        let offset = self.span.start as usize;
        let span = label.as_ref().map_or(self.span, |l| {
            Span::new(offset + l.offset(), offset + l.offset() + l.len())
        });
        let mut diagnostic = Diagnostic::new(
            Code::Syntax,
            loc(self.file, span),
            lowercase_first(&error.to_string()),
        );
        if let Some(text) = label.as_ref().and_then(|l| l.label()) {
            diagnostic = diagnostic.with_label(text);
        }
        if let Some(help) = error.help() {
            diagnostic = diagnostic.with_help(help.to_string());
        }
        self.diagnostics.push(diagnostic);
    }

    /// Reports an `E017` and returns `None`, for the callers that build a node.
    fn refuse<T>(
        &mut self,
        span: Span,
        message: impl Into<String>,
        label: Option<&str>,
        help: Option<&str>,
    ) -> Option<T> {
        self.unsupported(span, message, label, help);
        None
    }

    fn unsupported(
        &mut self,
        span: Span,
        message: impl Into<String>,
        label: Option<&str>,
        help: Option<&str>,
    ) {
        let refusal = self.refusal(span, message, label, help);
        self.report(refusal);
    }

    /// An `E017` at `span`.
    fn refusal(
        &self,
        span: Span,
        message: impl Into<String>,
        label: Option<&str>,
        help: Option<&str>,
    ) -> Diagnostic {
        let mut diagnostic = Diagnostic::new(Code::UnsupportedCedar, loc(self.file, span), message);
        if let Some(label) = label {
            diagnostic = diagnostic.with_label(label);
        }
        if let Some(help) = help {
            diagnostic = diagnostic.with_help(help);
        }
        diagnostic
    }

    /// Records a refusal: the policy gives no rule.
    fn report(&mut self, refusal: Diagnostic) {
        self.diagnostics.push(refusal);
        self.failed = true;
    }

    /// The source text of a span for a message: whitespace collapsed, long text shortened.
    fn excerpt(&self, span: Span) -> String {
        const MAX: usize = 60;
        let text = self
            .text
            .get(span.start as usize..span.end as usize)
            .unwrap_or("");
        let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if collapsed.chars().count() <= MAX {
            return collapsed;
        }
        let mut short: String = collapsed.chars().take(MAX - 1).collect();
        short.push('…');
        short
    }

    fn range_span(&self, range: Range<usize>) -> Option<Span> {
        token_span(self.tokens.get(range)?)
    }
}

/// The policies of a file in source order, when the whole file parses and every policy has a
/// syntax tree; `None` otherwise. Cedar names the policies of a text `policy0`, `policy1`, ...
/// in order, templates included.
fn parse_whole(text: &str) -> Option<Vec<Template>> {
    let set = PolicySet::from_str(text).ok()?;
    let count = set.policies().count() + set.templates().count();
    (0..count)
        .map(|i| {
            let id = PolicyId::new(format!("policy{i}"));
            match set.policy(&id) {
                Some(policy) => policy.to_pst().ok().map(|pst| pst.body().clone()),
                None => set.template(&id)?.to_pst().ok(),
            }
        })
        .collect()
}

/// How a test relates the principal or resource to an entity.
#[derive(Clone, Copy)]
enum Relation {
    Eq,
    In,
}

/// Who or what a policy is about, from its scope or a `when` test.
enum Scope {
    Principals(Vec<Node<Subject>>),
    Resources(Vec<Node<RuleTarget>>),
}

/// What one test of a condition says.
enum Test {
    /// A test of the context, and whether it is negated (`!=`, `== false`).
    Fact(Fact, bool),
    Scope(Scope),
    /// A test of a zone's clock, before negation.
    Clock(ClockTest),
    /// Refused; its diagnostic is reported.
    Refused,
    /// Not a test fz knows.
    Unknown,
}

/// Sets `slot` unless it is already set; whether it was set now.
fn set_once<T>(slot: &mut Option<T>, value: T) -> bool {
    if slot.is_some() {
        return false;
    }
    *slot = Some(value);
    true
}

/// A test of the request context, before negation.
enum Fact {
    Country(Vec<Node<String>>),
    Source(Vec<Node<String>>),
    Provider(Node<String>),
    Verified,
}

/// Parts of an `||` that each test one zone's clock (a test, or `&&` of tests): the clauses of
/// one time condition. `None` when some part tests anything else.
fn clock_clauses(parts: &[&Expr]) -> Option<Result<Vec<ClockClause>, clock::Refusal>> {
    let mut clauses = Vec::new();
    for part in parts {
        let mut clause: Option<ClockClause> = None;
        for test in flatten(part, BinaryOp::And) {
            let test = match clock::clock_atom(test)? {
                Ok(test) => test,
                Err(refused) => return Some(Err(refused)),
            };
            match &mut clause {
                Some(clause) if clause.zone == test.zone => clause.add(test.bound),
                Some(_) => return None,
                None => clause = Some(ClockClause::new(test)),
            }
        }
        clauses.push(clause?);
    }
    Some(Ok(clauses))
}

/// `context.KEY` (or `context["KEY"]`): the key.
fn context_key(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::GetAttr { expr, attr } if matches!(**expr, Expr::Var(Var::Context)) => Some(attr),
        _ => None,
    }
}

/// The operands of a chain of one associative operator, in source order.
fn flatten(expr: &Expr, op: BinaryOp) -> Vec<&Expr> {
    let mut parts = Vec::new();
    let mut pending = vec![expr];
    while let Some(e) = pending.pop() {
        match e {
            Expr::BinaryOp {
                op: found,
                left,
                right,
            } if *found == op => {
                pending.push(right);
                pending.push(left);
            }
            _ => parts.push(e),
        }
    }
    parts
}

fn is_type(uid: &EntityUID, name: &str) -> bool {
    uid.ty.0.namespace.is_empty() && uid.ty.0.id.as_str() == name
}

fn is_connect(uid: &EntityUID) -> bool {
    is_type(uid, "Action") && uid.eid == ACTION
}

/// Whether a text is an fz name, as `as NAME` takes it: `[a-z][a-z0-9_-]*`.
fn is_fz_name(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The policy's tokens joined by single spaces: comments and layout dropped, strings kept as
/// written, so that reformatting (by hand or by `cedar format`) keeps the derived rule id.
fn normalize(text: &str) -> String {
    lex(text)
        .iter()
        .map(|t| t.text)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the parts of one policy are, as token ranges.
#[derive(Debug, Default)]
struct Layout {
    /// The string of `@id("...")`.
    id_value: Option<usize>,
    /// Principal, action, resource.
    scope: Vec<Range<usize>>,
    /// The body of each `when`/`unless`, in order.
    clauses: Vec<Range<usize>>,
}

impl Layout {
    fn new(tokens: &[Token<'_>]) -> Self {
        let mut layout = Layout::default();
        let is = |i: usize, text: &str| tokens.get(i).is_some_and(|t| t.text == text);
        let mut i = 0;
        while is(i, "@") {
            let named_id = is(i + 1, "id");
            if is(i + 2, "(") {
                if named_id {
                    layout.id_value = Some(i + 3);
                }
                i = matching(tokens, i + 2).map_or(tokens.len(), |close| close + 1);
            } else {
                i += 2;
            }
        }
        // The effect, then the scope in parentheses.
        let open = i + 1;
        let Some(close) = is(open, "(").then(|| matching(tokens, open)).flatten() else {
            return layout;
        };
        layout.scope = split_top(tokens, open + 1..close, ",");
        i = close + 1;
        while (is(i, "when") || is(i, "unless")) && is(i + 1, "{") {
            let Some(close) = matching(tokens, i + 1) else {
                break;
            };
            layout.clauses.push(i + 2..close);
            i = close + 1;
        }
        layout
    }
}

/// The `||`/`&&`/`!` structure of an expression as written, for locations only.
#[derive(Debug)]
struct Shape {
    span: Span,
    kind: ShapeKind,
}

#[derive(Debug)]
enum ShapeKind {
    Or(Vec<Shape>),
    And(Vec<Shape>),
    Not(Box<Shape>),
    Atom,
}

impl Shape {
    /// Follows Cedar's precedence: `if` binds loosest, then `||`, `&&`, and a prefix `!` only
    /// when no binary operator follows its operand.
    fn new(tokens: &[Token<'_>]) -> Option<Shape> {
        let span = token_span(tokens)?;
        let first = tokens.first()?;
        let atom = Shape {
            span,
            kind: ShapeKind::Atom,
        };
        if first.text == "if" {
            return Some(atom);
        }
        if first.text == "(" && matching(tokens, 0) == Some(tokens.len() - 1) {
            return Shape::new(tokens.get(1..tokens.len() - 1)?).or(Some(atom));
        }
        for (op, make) in [
            ("||", ShapeKind::Or as fn(Vec<Shape>) -> ShapeKind),
            ("&&", ShapeKind::And),
        ] {
            let parts = split_top(tokens, 0..tokens.len(), op);
            if parts.len() > 1 {
                let mut children = Vec::new();
                for part in parts {
                    let child = Shape::new(tokens.get(part)?)?;
                    // `(a && b) && c` is one chain, as Cedar's tree is after flattening.
                    match child.kind {
                        ShapeKind::Or(inner) if op == "||" => children.extend(inner),
                        ShapeKind::And(inner) if op == "&&" => children.extend(inner),
                        kind => children.push(Shape {
                            span: child.span,
                            kind,
                        }),
                    }
                }
                return Some(Shape {
                    span,
                    kind: make(children),
                });
            }
        }
        if first.text == "!" {
            let rest = tokens.get(1..)?;
            if !has_top_binary_operator(rest) {
                let inner = Shape::new(rest)?;
                return Some(Shape {
                    span,
                    kind: ShapeKind::Not(Box::new(inner)),
                });
            }
        }
        Some(atom)
    }

    /// The operands, when this is a chain of `kind` with `count` of them.
    fn children(&self, op: BinaryOp, count: usize) -> Option<&[Shape]> {
        let children = match (&self.kind, op) {
            (ShapeKind::Or(c), BinaryOp::Or) | (ShapeKind::And(c), BinaryOp::And) => c,
            _ => return None,
        };
        (children.len() == count).then_some(children.as_slice())
    }
}

fn has_top_binary_operator(tokens: &[Token<'_>]) -> bool {
    const OPERATORS: [&str; 13] = [
        "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "in", "has", "like", "is",
    ];
    let mut depth = 0usize;
    tokens.iter().any(|t| {
        match t.text {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => depth = depth.saturating_sub(1),
            _ => {}
        }
        depth == 0 && t.kind != TokenKind::Str && OPERATORS.contains(&t.text)
    })
}

/// The index of the bracket that closes the one at `open`.
fn matching(tokens: &[Token<'_>], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate().skip(open) {
        match token.text {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Splits a token range at `separator` outside brackets.
fn split_top(tokens: &[Token<'_>], range: Range<usize>, separator: &str) -> Vec<Range<usize>> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = range.start;
    for i in range.clone() {
        let Some(token) = tokens.get(i) else { break };
        match token.text {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => depth = depth.saturating_sub(1),
            text if depth == 0 && text == separator && token.kind == TokenKind::Punct => {
                parts.push(start..i);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(start..range.end);
    parts
}

fn token_span(tokens: &[Token<'_>]) -> Option<Span> {
    Some(Span::new(tokens.first()?.start, tokens.last()?.end))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenKind {
    Ident,
    Str,
    Number,
    Punct,
}

/// A Cedar token with its byte range in the file. Comments and whitespace are skipped.
#[derive(Clone, Copy, Debug)]
struct Token<'a> {
    kind: TokenKind,
    text: &'a str,
    start: usize,
    end: usize,
}

impl Token<'_> {
    fn span(&self) -> Span {
        Span::new(self.start, self.end)
    }
}

/// Cedar's lexical structure, as far as finding policies and their parts needs it: Cedar
/// itself checks everything else.
fn lex(text: &str) -> Vec<Token<'_>> {
    const TWO_CHAR: [&str; 7] = ["::", "==", "!=", "<=", ">=", "&&", "||"];
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        let mut end = start + c.len_utf8();
        let kind = if c.is_whitespace() {
            continue;
        } else if c == '/' && chars.peek().is_some_and(|(_, n)| *n == '/') {
            for (_, n) in chars.by_ref() {
                if n == '\n' {
                    break;
                }
            }
            continue;
        } else if c == '"' {
            end = text.len();
            let mut escaped = false;
            for (i, n) in chars.by_ref() {
                match (escaped, n) {
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = i + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            TokenKind::Str
        } else if c.is_ascii_alphabetic() || c == '_' {
            while let Some((i, n)) = chars.peek().copied() {
                if !(n.is_ascii_alphanumeric() || n == '_') {
                    break;
                }
                end = i + n.len_utf8();
                chars.next();
            }
            TokenKind::Ident
        } else if c.is_ascii_digit() {
            while let Some((i, n)) = chars.peek().copied() {
                if !n.is_ascii_digit() {
                    break;
                }
                end = i + n.len_utf8();
                chars.next();
            }
            TokenKind::Number
        } else {
            if let Some((i, n)) = chars.peek().copied() {
                let pair = text.get(start..i + n.len_utf8()).unwrap_or("");
                if TWO_CHAR.contains(&pair) {
                    end = i + n.len_utf8();
                    chars.next();
                }
            }
            TokenKind::Punct
        };
        if let Some(token_text) = text.get(start..end) {
            tokens.push(Token {
                kind,
                text: token_text,
                start,
                end,
            });
        }
    }
    tokens
}

/// Cuts a file's tokens into policies: each ends at a `;` outside brackets. A policy head
/// (`permit (`, `forbid (` or `@name` first on its line) after the current policy's own head
/// starts a new one, so that a missing `;` or `}` costs one diagnostic, not the rest of the file.
fn split_policies(text: &str, tokens: &[Token<'_>]) -> Vec<Range<usize>> {
    let is = |i: usize, s: &str| tokens.get(i).is_some_and(|t| t.text == s);
    let first_on_line = |i: usize| {
        let previous_end = i
            .checked_sub(1)
            .and_then(|p| tokens.get(p))
            .map_or(0, |t| t.end);
        tokens
            .get(i)
            .and_then(|t| text.get(previous_end..t.start))
            .is_none_or(|gap| gap.contains('\n'))
    };
    let starts_policy = |i: usize| {
        first_on_line(i)
            && ((is(i, "permit") || is(i, "forbid")) && is(i + 1, "(")
                || is(i, "@")
                    && tokens
                        .get(i + 1)
                        .is_some_and(|t| t.kind == TokenKind::Ident))
    };
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut depth = 0usize;
    let mut seen_head = false;
    for (i, token) in tokens.iter().enumerate() {
        if seen_head && i > start && starts_policy(i) {
            chunks.push(start..i);
            start = i;
            depth = 0;
            seen_head = false;
        }
        match token.text {
            "(" => {
                let after_annotation = i.checked_sub(2).is_some_and(|a| is(a, "@"));
                if depth == 0 && !after_annotation && i > start {
                    seen_head = true;
                }
                depth += 1;
            }
            "[" | "{" => depth += 1,
            ")" | "]" | "}" => depth = depth.saturating_sub(1),
            ";" if depth == 0 => {
                chunks.push(start..i + 1);
                start = i + 1;
                seen_head = false;
            }
            _ => {}
        }
    }
    if start < tokens.len() {
        chunks.push(start..tokens.len());
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ast::Condition;

    /// The rules of a `.cedar` text written as fz rules, and its diagnostics as
    /// ``CODE `located text`: message [label]``, one per line.
    fn render(input: &str) -> String {
        let (file, diagnostics) = parse_cedar_file(FileId(0), input);
        let at = |loc: Loc| &input[loc.span.start as usize..loc.span.end as usize];
        let mut lines = Vec::new();
        for statement in &file.statements {
            let Statement::Rule(rule) = statement else {
                panic!("not a rule: {statement:?}");
            };
            let rule = &rule.node;
            let list = |items: Vec<String>| items.join(", ");
            let subjects = list(
                rule.subjects
                    .iter()
                    .map(|s| match &s.node {
                        Subject::Group(g) => g.clone(),
                        Subject::User(u) => format!("user \"{u}\""),
                    })
                    .collect(),
            );
            let targets = list(
                rule.targets
                    .iter()
                    .map(|t| {
                        let target = match &t.node.target {
                            Target::Resource(r) => r.clone(),
                            Target::Site(s) => format!("site {s}"),
                        };
                        // Where the reach differs from what an fz rule of the same effect
                        // has (a deny reaches inside its targets, an allow does not).
                        match (rule.effect, t.node.covers_inside) {
                            (Effect::Allow, true) => format!("{target} (and inside)"),
                            (Effect::Deny, false) => format!("{target} (alone)"),
                            _ => target,
                        }
                    })
                    .collect(),
            );
            let mut line = format!("{} {subjects} -> {targets}", rule.effect.as_str());
            let conditions: Vec<String> = rule
                .conditions
                .iter()
                .map(|c| {
                    let values = |v: &[Node<String>]| {
                        v.iter()
                            .map(|n| n.node.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    let not = |negated: bool| if negated { "not " } else { "" };
                    match &c.node {
                        Condition::Country { negated, codes } => {
                            format!("country {}in {}", not(*negated), values(codes))
                        }
                        Condition::Source { negated, networks } => {
                            format!("source {}in {}", not(*negated), values(networks))
                        }
                        Condition::Provider(p) => format!("provider {}", p.node),
                        Condition::ClientVerified => "client verified".to_owned(),
                        Condition::Time {
                            days,
                            windows,
                            zone,
                        } => {
                            let days: Vec<&str> =
                                days.iter().map(|d| d.node.first.as_str()).collect();
                            let windows: Vec<String> = windows
                                .iter()
                                .map(|w| format!("{}-{}", w.node.start, w.node.end))
                                .collect();
                            format!(
                                "time {} {} {}",
                                days.join(","),
                                windows.join(", "),
                                zone.node
                            )
                        }
                    }
                })
                .collect();
            if !conditions.is_empty() {
                line.push_str(&format!(" when {}", conditions.join(" and ")));
            }
            if let Some(name) = &rule.name {
                line.push_str(&format!(" as {}", name.node));
            }
            lines.push(line);
        }
        for d in &diagnostics {
            let mut line = format!("{} `{}`: {}", d.code.as_str(), at(d.loc), d.message);
            if let Some(label) = &d.label {
                line.push_str(&format!(" [{label}]"));
            }
            lines.push(line);
        }
        lines.join("\n")
    }

    fn check(input: &str, expected: &str) {
        assert_eq!(render(input), expected, "input: {input}");
    }

    /// A policy whose scope is fixed, around a condition text.
    fn when(condition: &str) -> String {
        format!("permit(principal, action, resource == Resource::\"r\") {condition};")
    }

    #[test]
    fn scope_maps_to_subjects_and_targets() {
        check(
            r#"permit(principal, action, resource == Resource::"gitlab");"#,
            "allow everyone -> gitlab",
        );
        check(
            r#"forbid(principal == User::"a@b.c", action == Action::"connect", resource in Site::"hq");"#,
            r#"deny user "a@b.c" -> site hq"#,
        );
        check(
            r#"permit(principal in Group::"eng", action in [Action::"connect"], resource == Resource::"db");"#,
            "allow eng -> db",
        );
        check(
            r#"permit(principal in User::"a@b.c", action in Action::"connect", resource in Resource::"db");"#,
            r#"allow user "a@b.c" -> db (and inside)"#,
        );
        check(
            r#"forbid(principal, action, resource == Resource::"db");"#,
            "deny everyone -> db (alone)",
        );
        check(
            r#"permit(principal in Group::"everyone", action, resource == Resource::"db");"#,
            "allow everyone -> db",
        );
        check(
            r#"permit(principal in Group::"nope", action, resource == Resource::"nope");"#,
            "allow nope -> nope",
        );
    }

    #[test]
    fn when_clauses_can_list_principals_and_resources() {
        check(
            r#"permit(principal, action, resource) when { resource in [Resource::"a", Site::"s"] };"#,
            "allow everyone -> a (and inside), site s (and inside)",
        );
        check(
            r#"permit(principal, action, resource) when { resource == Resource::"a" || resource in Site::"s" };"#,
            "allow everyone -> a, site s (and inside)",
        );
        check(
            &when(r#"when { principal in [Group::"eng", User::"a@b.c"] }"#),
            r#"allow eng, user "a@b.c" -> r"#,
        );
        check(
            &when(r#"when { principal == User::"a@b.c" || principal in Group::"eng" }"#),
            r#"allow user "a@b.c", eng -> r"#,
        );
        check(
            r#"forbid(principal in Group::"ops", action, resource)
               when { resource in [Resource::"a"] && context.country == "DE" };"#,
            "deny ops -> a when country in DE",
        );
        check(
            r#"permit(principal, action, resource)
               when { User::"a@b.c" == principal && Resource::"a" == resource };"#,
            r#"allow user "a@b.c" -> a"#,
        );
    }

    #[test]
    fn principals_and_resources_are_constrained_once_and_positively() {
        check(
            &when(r#"when { principal in Group::"a" } when { principal in Group::"b" }"#),
            "E017 `principal in Group::\"b\"`: the principal is constrained twice [fz cannot intersect two constraints]",
        );
        check(
            r#"permit(principal in Group::"a", action, resource == Resource::"r") when { principal in [Group::"b"] };"#,
            "E017 `principal in [Group::\"b\"]`: the principal is constrained twice [fz cannot intersect two constraints]",
        );
        check(
            &when(r#"when { resource in Site::"hq" }"#),
            "E017 `resource in Site::\"hq\"`: the resource is constrained twice [fz cannot intersect two constraints]",
        );
        check(
            &when(r#"unless { principal in Group::"x" }"#),
            "E017 `principal in Group::\"x\"`: `principal in Group::\"x\"` cannot be compiled into a decision table [negated: fz cannot leave principals or resources out of a rule]",
        );
        check(
            &when(r#"when { principal in [] }"#),
            "E017 `principal in []`: `principal in []` never holds: the list is empty [always false here]",
        );
        check(
            &when(r#"when { principal in [Group::"a", Team::"x"] }"#),
            "E017 `principal in [Group::\"a\", Team::\"x\"]`: unknown principal type `Team` [principals are `User`s and `Group`s]",
        );
        check(
            &when(r#"when { principal in Group::"a" || context.country == "DE" }"#),
            "E017 `principal in Group::\"a\" || context.country == \"DE\"`: `principal in Group::\"a\" || context.country == \"DE\"` cannot be compiled into a decision table [`||` between different facts]",
        );
        check(
            r#"permit(principal == User::"Alice@b.c", action, resource == Resource::"r");"#,
            "E017 `principal == User::\"Alice@b.c\"`: `User::\"Alice@b.c\"` never matches: Cedar compares entity ids exactly [an email with capitals]",
        );
    }

    /// `context.time["Europe/Berlin"]`, for the time tests.
    const T: &str = r#"context.time["Europe/Berlin"]"#;

    #[test]
    fn clock_tests_become_time_windows() {
        let t = |text: &str| when(&text.replace('T', T));
        check(
            &t(
                r#"when { ["mon", "tue", "wed", "thu", "fri"].contains(T.day) && T.minute >= 480 && T.minute < 1080 }"#,
            ),
            "allow everyone -> r when time mon,tue,wed,thu,fri 08:00-18:00 Europe/Berlin",
        );
        check(
            &t(
                r#"when { T.minute >= 480 && context.country == "DE" && 1080 > T.minute && T.day == "sat" }"#,
            ),
            "allow everyone -> r when country in DE and time sat 08:00-18:00 Europe/Berlin",
        );
        check(
            &t(
                r#"when { (T.day == "fri" && T.minute >= 1320) || (T.day == "sat" && T.minute < 360) }"#,
            ),
            "allow everyone -> r when time fri 22:00-06:00 Europe/Berlin",
        );
        check(
            &t(
                r#"when { (T.day != "sun" && T.minute >= 480 && T.minute <= 719) || (T.day != "sun" && T.minute > 779 && T.minute < 1080) }"#,
            ),
            "allow everyone -> r when time mon,tue,wed,thu,fri,sat 08:00-12:00, 13:00-18:00 Europe/Berlin",
        );
        check(
            &t(
                r#"when { (T.day == "sun" && !(T.minute < 1320)) || (T.day == "mon" && !(T.minute >= 0)) }"#,
            ),
            "allow everyone -> r when time sun 22:00-00:00 Europe/Berlin",
        );
        check(
            &t(
                r#"when { (!["sat", "sun"].contains(T.day) && T.minute >= 480) || (!["sat", "sun"].contains(T.day) && T.minute >= 0 && T.minute < 60) }"#,
            ),
            "allow everyone -> r when time mon,tue,wed,thu,fri 08:00-24:00, 00:00-01:00 Europe/Berlin",
        );
        check(
            &t(r#"when { T.minute < 360 || T.minute >= 1320 }"#),
            "allow everyone -> r when time mon,tue,wed,thu,fri,sat,sun 00:00-06:00, 22:00-24:00 Europe/Berlin",
        );
        check(
            &t(r#"unless { T.minute >= 1080 } unless { ["sat", "sun"].contains(T.day) }"#),
            "allow everyone -> r when time mon,tue,wed,thu,fri,sat,sun 00:00-18:00 Europe/Berlin and time mon,tue,wed,thu,fri 00:00-24:00 Europe/Berlin",
        );
        check(
            &when(
                r#"when { context.time["UTC"].minute >= 60 && context.time["Asia/Tokyo"].minute < 60 }"#,
            ),
            "allow everyone -> r when time mon,tue,wed,thu,fri,sat,sun 01:00-24:00 UTC and time mon,tue,wed,thu,fri,sat,sun 00:00-01:00 Asia/Tokyo",
        );
    }

    #[test]
    fn clock_tests_outside_one_time_window_are_refused() {
        let t = |text: &str| when(&text.replace('T', T));
        let refused = |located: &str, message: &str, label: &str| {
            format!("E017 `{}`: {message} [{label}]", located.replace('T', T))
        };
        check(
            &t(r#"when { T.day == "monday" }"#),
            &refused(
                r#"T.day == "monday""#,
                "`monday` is not a day: the clock's day is one of mon, tue, wed, thu, fri, sat, sun",
                "never equal to the day",
            ),
        );
        check(
            &t(
                r#"when { (T.day == "mon" && T.minute >= 60) || (T.day == "tue" && T.minute >= 120) }"#,
            ),
            &refused(
                r#"(T.day == "mon" && T.minute >= 60) || (T.day == "tue" && T.minute >= 120)"#,
                "the windows of one time condition must start on the same days",
                "windows on different days",
            ),
        );
        check(
            &when(
                r#"when { context.time["UTC"].minute >= 60 || context.time["CET"].minute >= 60 }"#,
            ),
            r#"E017 `context.time["UTC"].minute >= 60 || context.time["CET"].minute >= 60`: one time condition reads the clock of one zone [`||` between clocks of different zones]"#,
        );
        check(
            &t(r#"when { T.minute >= 600 && T.minute < 600 }"#),
            &refused(
                r#"T.minute >= 600 && T.minute < 600"#,
                "this window is empty, so it never holds",
                "never holds",
            ),
        );
        check(
            &t(r#"when { T.second == 0 }"#),
            &refused(
                r#"T.second == 0"#,
                "`second` of a zone's clock cannot be tested like this",
                "not a time window fz can hold",
            ),
        );
        let negated = r#"context.time["UTC"].minute >= 480 && context.time["UTC"].minute < 1080"#;
        check(
            &when(&format!("unless {{ {negated} }}")),
            &format!("E017 `{negated}`: a time window cannot be negated [negated time window]"),
        );
    }

    #[test]
    fn id_annotations_name_rules() {
        check(
            r#"@id("eng-web") permit(principal in Group::"eng", action, resource == Resource::"gitlab");"#,
            "allow eng -> gitlab as eng-web",
        );
        check(
            r#"@advice("x") @id("eng-web") @other permit(principal, action, resource == Resource::"gitlab");"#,
            "allow everyone -> gitlab as eng-web",
        );
        check(
            r#"@id("Eng Web") permit(principal, action, resource == Resource::"r");"#,
            "E017 `\"Eng Web\"`: rule name `Eng Web` is not an fz name [from this `@id`]",
        );
        check(
            r#"@id permit(principal, action, resource == Resource::"r");"#,
            "E017 `@id permit(principal, action, resource == Resource::\"r\");`: rule name `` is not an fz name [from this `@id`]",
        );
    }

    #[test]
    fn conditions_map_to_fz_conditions() {
        check(
            &when(r#"when { context.country == "DE" }"#),
            "allow everyone -> r when country in DE",
        );
        check(
            &when(r#"when { "DE" == context.country }"#),
            "allow everyone -> r when country in DE",
        );
        check(
            &when(r#"when { context["country"] == "DE" }"#),
            "allow everyone -> r when country in DE",
        );
        check(
            &when(r#"when { ["DE", "FR"].contains(context.country) }"#),
            "allow everyone -> r when country in DE, FR",
        );
        check(
            &when(r#"when { context.country == "DE" || ["FR", "IT"].contains(context.country) }"#),
            "allow everyone -> r when country in DE, FR, IT",
        );
        check(
            &when(r#"when { context.source_ip.isInRange(ip("10.0.0.0/8")) }"#),
            "allow everyone -> r when source in 10.0.0.0/8",
        );
        check(
            &when(r#"when { [context.country].containsAny(["DE", "FR"]) }"#),
            "allow everyone -> r when country in DE, FR",
        );
        check(
            &when(r#"when { ["DE", "FR"].containsAny([context.country]) }"#),
            "allow everyone -> r when country in DE, FR",
        );
        check(
            &when(
                r#"when { context.source_ip.isInRange(ip("10.0.0.0/8")) || (context.source_ip.isInRange(ip("fd00::/8"))) }"#,
            ),
            "allow everyone -> r when source in 10.0.0.0/8, fd00::/8",
        );
        check(
            &when(r#"when { context.provider == "okta" }"#),
            "allow everyone -> r when provider okta",
        );
        check(
            &when(r#"when { context.client_verified }"#),
            "allow everyone -> r when client verified",
        );
        check(
            &when(r#"when { context.client_verified == true }"#),
            "allow everyone -> r when client verified",
        );
        check(
            &when(r#"when { true == context.client_verified }"#),
            "allow everyone -> r when client verified",
        );
        check(
            &when(r#"when { context.client_verified != false }"#),
            "allow everyone -> r when client verified",
        );
        check(&when(r#"when { true }"#), "allow everyone -> r");
    }

    #[test]
    fn conjunctions_become_several_conditions() {
        let all = "allow everyone -> r when country in DE and provider okta and client verified";
        check(
            &when(
                r#"when { context.country == "DE" && context.provider == "okta" && context.client_verified }"#,
            ),
            all,
        );
        check(
            &when(
                r#"when { (context.country == "DE" && context.provider == "okta") && context.client_verified }"#,
            ),
            all,
        );
        check(
            &when(
                r#"when { context.country == "DE" } when { context.provider == "okta" && context.client_verified }"#,
            ),
            all,
        );
        check(
            &when(r#"when { context.provider == "okta" } unless { context.country == "RU" }"#),
            "allow everyone -> r when provider okta and country not in RU",
        );
    }

    #[test]
    fn unless_and_not_negate_country_and_source() {
        check(
            &when(r#"unless { context.country == "RU" }"#),
            "allow everyone -> r when country not in RU",
        );
        check(
            &when(r#"unless { context.source_ip.isInRange(ip("10.0.0.0/8")) }"#),
            "allow everyone -> r when source not in 10.0.0.0/8",
        );
        check(
            &when(r#"when { context.country != "RU" }"#),
            "allow everyone -> r when country not in RU",
        );
        check(
            &when(r#"when { !["RU", "BY"].contains(context.country) }"#),
            "allow everyone -> r when country not in RU, BY",
        );
        check(
            &when(
                r#"unless { context.country == "RU" || context.source_ip.isInRange(ip("192.0.2.0/24")) }"#,
            ),
            "allow everyone -> r when country not in RU and source not in 192.0.2.0/24",
        );
        check(
            &when(r#"when { !(context.country == "RU" || context.country == "BY") }"#),
            "allow everyone -> r when country not in RU, BY",
        );
        check(
            &when(
                r#"when { !(context.source_ip.isInRange(ip("10.0.0.0/8")) || context.source_ip.isInRange(ip("fd00::/8"))) }"#,
            ),
            "allow everyone -> r when source not in 10.0.0.0/8, fd00::/8",
        );
        check(
            &when(r#"unless { !context.client_verified }"#),
            "allow everyone -> r when client verified",
        );
        check(&when(r#"unless { false }"#), "allow everyone -> r");
    }

    #[test]
    fn scope_constructs_are_refused() {
        check(
            r#"permit(principal is User, action, resource == Resource::"r");"#,
            "E017 `principal is User`: `principal is User` cannot be compiled into a decision table [`is` is not supported]",
        );
        check(
            r#"permit(principal is User in Group::"g", action, resource == Resource::"r");"#,
            "E017 `principal is User in Group::\"g\"`: `principal is User in Group::\"g\"` cannot be compiled into a decision table [`is` is not supported]",
        );
        check(
            r#"permit(principal == Group::"g", action, resource == Resource::"r");"#,
            "E017 `principal == Group::\"g\"`: `principal == Group::\"g\"` never holds: the principal is a user [a user is never equal to a group]",
        );
        check(
            r#"permit(principal == Team::"x", action, resource == Resource::"r");"#,
            "E017 `principal == Team::\"x\"`: unknown principal type `Team` [principals are `User`s and `Group`s]",
        );
        check(
            r#"permit(principal in Fz::User::"a@b.c", action, resource == Resource::"r");"#,
            "E017 `principal in Fz::User::\"a@b.c\"`: unknown principal type `Fz::User` [principals are `User`s and `Group`s]",
        );
        check(
            r#"permit(principal in ?principal, action, resource == Resource::"r");"#,
            "E017 `principal in ?principal`: templates cannot be compiled into a decision table: `?principal` has no value [a template slot]",
        );
        check(
            r#"permit(principal, action == Action::"read", resource == Resource::"r");"#,
            "E017 `action == Action::\"read\"`: `action == Action::\"read\"` names an action other than `connect` [the only action is `Action::\"connect\"`]",
        );
        check(
            r#"permit(principal, action in [Action::"connect", Action::"read"], resource == Resource::"r");"#,
            "E017 `action in [Action::\"connect\", Action::\"read\"]`: `action in [Action::\"connect\", Action::\"read\"]` names an action other than `connect` [the only action is `Action::\"connect\"`]",
        );
        check(
            r#"permit(principal, action in [], resource == Resource::"r");"#,
            "E017 `action in []`: `action in []` names an action other than `connect` [the only action is `Action::\"connect\"`]",
        );
        check(
            r#"permit(principal, action, resource);"#,
            "E017 `resource`: a policy must name a resource or a site [the decision table is per resource]",
        );
        check(
            r#"permit(principal, action, resource == Site::"hq");"#,
            "E017 `resource == Site::\"hq\"`: `resource == Site::\"hq\"` never holds: a resource is in a site [a resource is never equal to a site]",
        );
        check(
            r#"permit(principal, action, resource is Resource);"#,
            "E017 `resource is Resource`: `resource is Resource` cannot be compiled into a decision table [`is` is not supported]",
        );
        check(
            r#"permit(principal, action, resource in ?resource);"#,
            "E017 `resource in ?resource`: templates cannot be compiled into a decision table: `?resource` has no value [a template slot]",
        );
        check(
            r#"permit(principal, action, resource == Host::"x");"#,
            "E017 `resource == Host::\"x\"`: unknown resource type `Host` [resources are `Resource`s, in `Site`s]",
        );
        // Every refusal of one policy is reported, and the policy gives no rule.
        check(
            r#"permit(principal is User, action == Action::"read", resource);"#,
            "E017 `principal is User`: `principal is User` cannot be compiled into a decision table [`is` is not supported]\nE017 `action == Action::\"read\"`: `action == Action::\"read\"` names an action other than `connect` [the only action is `Action::\"connect\"`]\nE017 `resource`: a policy must name a resource or a site [the decision table is per resource]",
        );
    }

    #[test]
    fn conditions_outside_the_fz_condition_set_are_refused() {
        let refused = |expr: &str, label: &str| {
            format!("E017 `{expr}`: `{expr}` cannot be compiled into a decision table [{label}]")
        };
        let unknown = |expr: &str| refused(expr, "not a condition fz can evaluate");
        for expr in [
            r#"context.device == "x""#,
            "context has country",
            r#"context.country like "D*""#,
            r#"principal.department == "x""#,
            "if context.client_verified then true else false",
            "[].contains(context.country)",
            r#"["DE", 1].contains(context.country)"#,
            r#"context.source_ip == ip("1.2.3.4")"#,
            "context.source_ip.isInRange(context.office)",
            r#"context.country == context.provider"#,
        ] {
            check(&when(&format!("when {{ {expr} }}")), &unknown(expr));
        }
        check(
            &when(r#"when { context.country == "DE" && 1 + 1 == 2 }"#),
            &unknown("1 + 1 == 2"),
        );
        let different = "`||` between different facts";
        for expr in [
            r#"context.country == "DE" || context.provider == "okta""#,
            r#"context.provider == "a" || context.provider == "b""#,
            r#"context.country == "DE" || context.country != "FR""#,
        ] {
            check(
                &when(&format!("when {{ {expr} }}")),
                &refused(expr, different),
            );
        }
        check(
            &when(r#"unless { context.provider == "okta" }"#),
            &refused(
                r#"context.provider == "okta""#,
                "negated: fz can require a provider, not exclude one",
            ),
        );
        check(
            &when(r#"when { context.provider != "okta" }"#),
            &refused(
                r#"context.provider != "okta""#,
                "negated: fz can require a provider, not exclude one",
            ),
        );
        let unverified = "negated: fz can require a verified client, not an unverified one";
        check(
            &when("unless { context.client_verified }"),
            &refused("context.client_verified", unverified),
        );
        check(
            &when("when { context.client_verified == false }"),
            &refused("context.client_verified == false", unverified),
        );
        check(
            &when("when { !context.client_verified }"),
            &refused("!context.client_verified", unverified),
        );
        check(
            &when(r#"unless { context.country == "DE" && context.client_verified }"#),
            &refused(
                r#"context.country == "DE" && context.client_verified"#,
                "negated, this `&&` is an `||` of negations",
            ),
        );
        check(
            &when(r#"when { context.source_ip.isInRange(ip("::ffff:10.0.0.0/104")) }"#),
            "E017 `\"::ffff:10.0.0.0/104\"`: Cedar cannot evaluate `ip(\"::ffff:10.0.0.0/104\")` [Cedar skips a policy whose evaluation fails]",
        );
        check(
            &when(r#"unless { ["DE", "ru"].contains(context.country) }"#),
            "E017 `\"ru\"`: country `ru` never equals `context.country` [Cedar compares strings exactly]",
        );
        check(
            &when("when { false }"),
            "E017 `false`: this condition never holds, so the policy never applies [always false here]",
        );
        check(
            &when(r#"when { context.provider == "Okta" }"#),
            "E017 `\"Okta\"`: provider `Okta` is not an fz provider id [never equal to the provider a user signed in with]",
        );
    }

    #[test]
    fn syntax_errors_carry_cedars_message_and_location() {
        check(
            &when(r#"when { context.country = "DE" }"#),
            "E001 `context.country = \"DE\"`: '=' is not a valid operator in Cedar",
        );
        check(
            &when(r#"when { foo(context.country) }"#),
            "E001 `foo(context.country)`: `foo` is not a valid function",
        );
        check(
            r#"allow(principal, action, resource == Resource::"r");"#,
            "E001 `allow`: invalid policy effect: allow",
        );
        check(
            r#"permit(principal, action == Other::"connect", resource == Resource::"r");"#,
            "E001 `Other::\"connect\"`: expected an entity uid with type `Action` but got `Other::\"connect\"`",
        );
        check(
            r#"permit(principal, action, resource == Resource::"r")"#,
            "E001 ``: unexpected end of input [expected `;` or identifier]",
        );
    }

    #[test]
    fn a_broken_policy_costs_one_diagnostic_not_the_rest_of_the_file() {
        check(
            "permit(principal, action, resource == Resource::\"a\");\n\
             permit(principal, action, resource == Resource::\"b\") when { ;\n\
             permit(principal, action, resource == Resource::\"c\");",
            "allow everyone -> a\nallow everyone -> c\nE001 `;`: unexpected token `;` [expected `!`, `(`, `-`, `[`, `{`, `}`, `false`, identifier, `if`, number, `?principal`, `?resource`, string literal, or `true`]",
        );
        // A missing `;` or `}`: the next policy head on a new line starts a new policy.
        check(
            "permit(principal, action, resource == Resource::\"a\") when { context.client_verified\n\
             // the next one is fine\n\
             @id(\"b\")\n\
             permit(principal, action, resource == Resource::\"b\")\n\
             forbid(principal, action, resource == Resource::\"c\");",
            "deny everyone -> c (alone)\n\
             E001 ``: unexpected end of input [expected `!=`, `&&`, `(`, `*`, `+`, `-`, `.`, `<`, `<=`, `==`, `>`, `>=`, `[`, `||`, `}`, `has`, `in`, `is`, or `like`]\n\
             E001 ``: unexpected end of input [expected `;` or identifier]",
        );
        check("// only a comment\n", "");
        check("", "");
    }

    #[test]
    fn nodes_are_located_in_the_policy_text() {
        let input = "// access\n@id(\"x\")\npermit (\n  principal in Group::\"eng\",\n  action,\n  resource in Site::\"hq\"\n) when {\n  [\"DE\", \"FR\"].contains(context.country) &&\n  context.provider == \"okta\"\n} unless { context.source_ip.isInRange(ip(\"10.0.0.0/8\")) };\n";
        let (file, diagnostics) = parse_cedar_file(FileId(3), input);
        assert_eq!(diagnostics, []);
        let Some(Statement::Rule(rule)) = file.statements.first() else {
            panic!("no rule");
        };
        let at = |loc: Loc| {
            assert_eq!(loc.file, FileId(3));
            &input[loc.span.start as usize..loc.span.end as usize]
        };
        assert!(at(rule.loc).starts_with("@id(\"x\")\npermit ("));
        assert!(at(rule.loc).ends_with(")) };"));
        let name = rule.node.name.as_ref().map(|n| at(n.loc));
        assert_eq!(name, Some("\"x\""));
        let subjects: Vec<_> = rule.node.subjects.iter().map(|s| at(s.loc)).collect();
        assert_eq!(subjects, ["\"eng\""]);
        let targets: Vec<_> = rule.node.targets.iter().map(|t| at(t.loc)).collect();
        assert_eq!(targets, ["\"hq\""]);
        let conditions: Vec<_> = rule.node.conditions.iter().map(|c| at(c.loc)).collect();
        assert_eq!(
            conditions,
            [
                "[\"DE\", \"FR\"].contains(context.country)",
                "context.provider == \"okta\"",
                "context.source_ip.isInRange(ip(\"10.0.0.0/8\"))",
            ]
        );
        let values: Vec<_> = rule
            .node
            .conditions
            .iter()
            .flat_map(|c| match &c.node {
                Condition::Country { codes, .. } => codes.iter().map(|n| at(n.loc)).collect(),
                Condition::Source { networks, .. } => networks.iter().map(|n| at(n.loc)).collect(),
                Condition::Provider(p) => vec![at(p.loc)],
                _ => vec![],
            })
            .collect();
        assert_eq!(values, ["\"DE\"", "\"FR\"", "\"okta\"", "\"10.0.0.0/8\""]);
        assert_eq!(
            rule.node.normalized_text,
            "@ id ( \"x\" ) permit ( principal in Group :: \"eng\" , action , resource in Site :: \"hq\" ) when { [ \"DE\" , \"FR\" ] . contains ( context . country ) && context . provider == \"okta\" } unless { context . source_ip . isInRange ( ip ( \"10.0.0.0/8\" ) ) } ;"
        );
    }

    #[test]
    fn derived_text_ignores_comments_and_layout() {
        let text = |input: &str| {
            let (file, _) = parse_cedar_file(FileId(0), input);
            match file.statements.first() {
                Some(Statement::Rule(rule)) => rule.node.normalized_text.clone(),
                _ => String::new(),
            }
        };
        assert_eq!(
            text("permit(principal,action,resource==Resource::\"r\"); // note"),
            text("// note\npermit(principal,action,\n   resource==Resource::\"r\"  // note\n);"),
        );
        assert_ne!(
            text("permit(principal,action,resource==Resource::\"r\");"),
            text("permit(principal,action,resource==Resource::\"s\");")
        );
    }

    #[test]
    fn shapes_follow_cedar_precedence() {
        let shape = |input: &str| {
            let tokens = lex(input);
            let shape = Shape::new(&tokens).map(|s| describe(&s, input));
            shape.unwrap_or_default()
        };
        fn describe(shape: &Shape, input: &str) -> String {
            let list = |children: &[Shape]| {
                children
                    .iter()
                    .map(|c| describe(c, input))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            match &shape.kind {
                ShapeKind::Or(c) => format!("(or {})", list(c)),
                ShapeKind::And(c) => format!("(and {})", list(c)),
                ShapeKind::Not(c) => format!("(not {})", describe(c, input)),
                ShapeKind::Atom => {
                    input[shape.span.start as usize..shape.span.end as usize].to_owned()
                }
            }
        }
        assert_eq!(shape("a && b || c"), "(or (and a b) c)");
        assert_eq!(shape("a && (b || c) && d"), "(and a (or b c) d)");
        assert_eq!(shape("(a && b) && !(c)"), "(and a b (not c))");
        assert_eq!(shape("!a == b"), "!a == b");
        assert_eq!(shape("if a && b then c else d"), "if a && b then c else d");
        assert_eq!(shape("f(a && b) && x[\"&&\"]"), "(and f(a && b) x[\"&&\"])");
    }

    #[test]
    fn lexer_skips_comments_and_keeps_strings_whole() {
        let tokens: Vec<_> = lex("a::\"x // y\\\"\" // c\n&& !=1")
            .iter()
            .map(|t| t.text)
            .collect();
        assert_eq!(tokens, ["a", "::", "\"x // y\\\"\"", "&&", "!=", "1"]);
        let tokens: Vec<_> = lex("\"open").iter().map(|t| t.text).collect();
        assert_eq!(tokens, ["\"open"]);
    }
}
