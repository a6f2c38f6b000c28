//! `fzc`: check, compile and query fz policy trees. Exit codes are a contract for CI and
//! scripts: 0 success, 1 errors in the tree or failing tests, 2 usage or IO errors.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod diff;
mod explain;
mod fmt;
mod git;
mod lsp;
mod outcomes;
mod query;
mod render;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use explain::Explanation;
use fz_compiler::{Bundle, Checked, DecisionTable};
use render::{Format, Renderer, ReportFormat};

#[derive(Debug, Parser)]
#[command(
    name = "fzc",
    version,
    about = "Check, compile and query fz access policy trees"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse, resolve and analyse a tree, and run its tests and invariants.
    Check {
        /// The policy tree.
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
        #[arg(long, value_enum, default_value = "human")]
        format: ReportFormat,
        /// Where the language reference (docs/language.md) is published: SARIF rules then link
        /// to their code's section there.
        #[arg(long, value_name = "URL")]
        docs_url: Option<String>,
    },
    /// Run a tree's tests and invariants, list each with its outcome, and name the rules no
    /// test exercises.
    Test {
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Fail unless the tests exercise at least this share of the rules, in percent.
        #[arg(long, value_name = "PERCENT")]
        min_coverage: Option<outcomes::MinCoverage>,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Rewrite `.fz` files in the canonical layout (comments kept, no statement moved to
    /// another line); with `--check`, only list those that are not in it.
    Fmt {
        /// Trees (every `.fz` file below) or files.
        #[arg(default_value = "policies")]
        paths: Vec<PathBuf>,
        /// Change nothing; exit 1 if any file would change.
        #[arg(long)]
        check: bool,
    },
    /// Serve the Language Server Protocol on standard input and output, for editors.
    Lsp,
    /// Write the decision table bundle of a tree that passes `check`.
    Compile {
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Where to write the bundle.
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Decide requests against a tree (or a compiled bundle) and name the rules that decided.
    Query(QueryArgs),
    /// Who gains or loses access to what between two trees: every request the two decision
    /// tables decide differently, with the rules responsible on each side.
    Diff {
        /// The tree before: a directory, or with `--git` a revision.
        old: String,
        /// The tree after: a directory, or with `--git` a revision.
        new: String,
        /// With `--git`: the tree's directory in the repository.
        dir: Option<PathBuf>,
        /// Read both trees from git revisions (`fzc diff --git main HEAD policies`).
        #[arg(long)]
        git: bool,
        #[arg(long, value_enum, default_value = "human")]
        format: diff::DiffFormat,
        /// Exit 1 when access is gained, lost, or either.
        #[arg(long, value_enum, value_name = "WHAT")]
        fail_on: Option<diff::FailOn>,
    },
    /// Print the Cedar schema of a tree that passes `check`, for Cedar's own validator.
    Schema {
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Cedar schema syntax (the one format).
        #[arg(long, required = true)]
        cedar: bool,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Explain a diagnostic code (`E019`): what it means, an example, the fix. Without a code,
    /// list them all.
    Explain { code: Option<String> },
    /// Write the `.fz` rules of a tree that passes `check` as Cedar policies.
    Export {
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Cedar policies (the one format).
        #[arg(long, required = true)]
        cedar: bool,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
}

#[derive(Debug, Args)]
struct QueryArgs {
    /// The policy tree, or a bundle written by `fzc compile`.
    #[arg(default_value = "policies")]
    dir: PathBuf,
    #[arg(long, required_unless_present = "requests")]
    user: Option<String>,
    /// A group the identity provider says the user is in; repeat for more.
    #[arg(long = "group")]
    groups: Vec<String>,
    #[arg(long, required_unless_present = "requests")]
    resource: Option<String>,
    /// `tcp/443`, `udp/53`, `icmp`.
    #[arg(long)]
    port: Option<String>,
    /// RFC 3339 time of the request.
    #[arg(long)]
    at: Option<String>,
    /// The client's public IP.
    #[arg(long)]
    from: Option<String>,
    /// ISO 3166 alpha-2 country of the client's address.
    #[arg(long)]
    country: Option<String>,
    /// Identity provider the user signed in with.
    #[arg(long)]
    provider: Option<String>,
    /// The device is marked verified.
    #[arg(long)]
    verified: bool,
    /// Read one JSON request per line from this file and write one decision per line.
    #[arg(long, conflicts_with_all = ["user", "resource", "groups", "port", "at", "from", "country", "provider", "verified"])]
    requests: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "human")]
    format: Format,
}

/// Exit codes of the contract.
const TREE_ERRORS: u8 = 1;
const USAGE_OR_IO: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { USAGE_OR_IO } else { 0 });
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(USAGE_OR_IO)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check {
            dir,
            deny_warnings,
            format,
            docs_url,
        } => {
            let checked = check(&dir)?;
            print!("{}", report(&checked, &dir, format, docs_url.as_deref()));
            let failed = checked.has_errors() || (deny_warnings && !checked.diagnostics.is_empty());
            Ok(if failed {
                ExitCode::from(TREE_ERRORS)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Compile {
            dir,
            output,
            format,
        } => {
            let checked = check(&dir)?;
            let Some(table) = checked.table.clone() else {
                return Ok(refuse(&checked, &dir, format, "no bundle written"));
            };
            let bundle = Bundle::new(table)?;
            let bytes = bundle.to_bytes()?;
            write_atomically(&output, &bytes)?;
            if format == Format::Human {
                for diagnostic in &checked.diagnostics {
                    eprint!(
                        "{}",
                        Renderer {
                            sources: &checked.sources,
                            root: &display(&dir)
                        }
                        .human(diagnostic)
                    );
                }
                println!(
                    "wrote {} ({} rules, {} resources, {} bytes), {}",
                    output.display(),
                    bundle.table.rules.len(),
                    bundle.table.resources.len(),
                    bytes.len(),
                    bundle.hash
                );
            } else {
                let summary = serde_json::json!({
                    "output": output.display().to_string(),
                    "hash": bundle.hash,
                    "rules": bundle.table.rules.len(),
                    "resources": bundle.table.resources.len(),
                    "bytes": bytes.len(),
                });
                println!("{summary}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Query(args) => run_query(args),
        Command::Diff {
            old,
            new,
            dir,
            git,
            format,
            fail_on,
        } => run_diff(diff::sources(git, old, new, dir)?, format, fail_on),
        Command::Lsp => Ok(ExitCode::from(lsp::serve()?)),
        Command::Fmt { paths, check } => {
            let outcome = fmt::run(&paths, check)?;
            if check && !outcome.changed.is_empty() {
                let count = outcome.changed.len();
                eprintln!(
                    "{count} {} not in the canonical layout; `fzc fmt` rewrites {}",
                    plural(count, "file"),
                    if count == 1 { "it" } else { "them" }
                );
            }
            let failed = outcome.unparsed > 0 || (check && !outcome.changed.is_empty());
            Ok(if failed {
                ExitCode::from(TREE_ERRORS)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Test {
            dir,
            min_coverage,
            format,
        } => {
            let checked = check(&dir)?;
            let root = display(&dir);
            let renderer = Renderer {
                sources: &checked.sources,
                root: &root,
            };
            let ran = outcomes::ran(&checked);
            match format {
                Format::Json => print!("{}", outcomes::json(&checked, &renderer, min_coverage)),
                Format::Human if ran => {
                    print!("{}", outcomes::human(&checked, &renderer, min_coverage));
                }
                Format::Human => return Ok(refuse(&checked, &dir, format, "tests not run")),
            }
            let passed = ran
                && checked.tests.failed == 0
                && outcomes::Coverage::of(&checked.tests).reaches(min_coverage);
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(TREE_ERRORS)
            })
        }
        Command::Explain { code: None } => {
            for explanation in explain::all() {
                println!("{}  {}", explanation.code, explanation.title);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain { code: Some(code) } => match Explanation::of(&code) {
            Some(explanation) => {
                println!("{}", explanation.text);
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!(
                    "error: `{code}` is not a diagnostic code; `fzc explain` lists them (E001 to E022, W001 to W006)"
                );
                Ok(ExitCode::from(USAGE_OR_IO))
            }
        },
        Command::Schema {
            dir,
            cedar: _,
            format,
        } => {
            let checked = check(&dir)?;
            let Some(table) = &checked.table else {
                return Ok(refuse(&checked, &dir, format, "no schema written"));
            };
            print!("{}", fz_compiler::cedar::schema(table, &display(&dir)));
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            dir,
            cedar: _,
            output,
            format,
        } => {
            let mut checked = check(&dir)?;
            match fz_compiler::cedar::export(&checked, &display(&dir)) {
                Ok(policies) => {
                    match output {
                        Some(path) => write_atomically(&path, policies.as_bytes())?,
                        None => print!("{policies}"),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(diagnostics) => {
                    checked.diagnostics = diagnostics;
                    Ok(refuse(&checked, &dir, format, "nothing exported"))
                }
            }
        }
    }
}

/// Reports why a tree (or its export) was refused, on standard error; the exit code to return.
fn refuse(checked: &Checked, dir: &Path, format: Format, outcome: &str) -> ExitCode {
    eprint!("{}", report(checked, dir, format.into(), None));
    if format == Format::Human {
        eprintln!("error: `{}` has errors; {outcome}", dir.display());
    }
    ExitCode::from(TREE_ERRORS)
}

fn check(dir: &Path) -> anyhow::Result<Checked> {
    let sources = fz_compiler::load_tree(dir)?;
    Ok(fz_compiler::check(sources))
}

fn display(dir: &Path) -> String {
    dir.display().to_string()
}

/// The report of `check` (and of a refused `compile`).
fn report(checked: &Checked, dir: &Path, format: ReportFormat, docs_url: Option<&str>) -> String {
    let root = display(dir);
    let renderer = Renderer {
        sources: &checked.sources,
        root: &root,
    };
    match format {
        ReportFormat::Sarif => {
            let log = renderer.sarif(&checked.diagnostics, docs_url);
            format!("{log:#}\n")
        }
        ReportFormat::Github => {
            // The commands annotate; the summary is a plain line of the job's log.
            let mut out: String = checked
                .diagnostics
                .iter()
                .map(|d| renderer.github(d))
                .collect();
            out += &summary(checked, &root);
            out
        }
        ReportFormat::Json => {
            let diagnostics: Vec<_> = checked
                .diagnostics
                .iter()
                .map(|d| renderer.json(d))
                .collect();
            let report = serde_json::json!({
                "diagnostics": diagnostics,
                "tests": { "passed": checked.tests.passed, "failed": checked.tests.failed },
            });
            format!("{report}\n")
        }
        ReportFormat::Human => {
            let mut out = String::new();
            for diagnostic in &checked.diagnostics {
                out += &renderer.human(diagnostic);
                out += "\n";
            }
            out += &summary(checked, &root);
            out
        }
    }
}

/// The last line of a human report: what was checked and what was found.
fn summary(checked: &Checked, root: &str) -> String {
    let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = checked.diagnostics.len() - errors;
    let found = match &checked.table {
        Some(table) => format!(
            "{} {}, {} {}; tests and invariants: {} passed, {} failed",
            table.resources.len(),
            plural(table.resources.len(), "resource"),
            table.rules.len(),
            plural(table.rules.len(), "rule"),
            checked.tests.passed,
            checked.tests.failed
        ),
        None if checked.tests.failed > 0 => {
            format!(
                "tests and invariants: {} passed, {} failed",
                checked.tests.passed, checked.tests.failed
            )
        }
        None => "tests not run".to_owned(),
    };
    format!(
        "{}: {} {} checked, {found}; {errors} {}, {warnings} {}\n",
        root,
        checked.sources.len(),
        plural(checked.sources.len(), "file"),
        plural(errors, "error"),
        plural(warnings, "warning")
    )
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// Writes to a temporary file beside the target and renames it over, so a reader never sees a
/// half-written bundle.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    // An existing file keeps what it was: written through a symbolic link to its target, and
    // with its permissions (a policy file kept private stays private).
    let existing = std::fs::canonicalize(path).ok();
    let path = existing.as_deref().unwrap_or(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".to_owned());
    let temporary = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = std::fs::write(&temporary, bytes)
        .with_context(|| format!("cannot write `{}`", temporary.display()))
        .and_then(|()| match existing.as_deref().map(std::fs::metadata) {
            Some(Ok(metadata)) => std::fs::set_permissions(&temporary, metadata.permissions())
                .with_context(|| {
                    format!("cannot set the permissions of `{}`", temporary.display())
                }),
            _ => Ok(()),
        })
        .and_then(|()| {
            std::fs::rename(&temporary, path)
                .with_context(|| format!("cannot write `{}`", path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

fn run_diff(
    sides: [diff::TreeSource; 2],
    format: diff::DiffFormat,
    fail_on: Option<diff::FailOn>,
) -> anyhow::Result<ExitCode> {
    // The two trees are checked at once: on a large tree that halves the wait on two cores.
    let checked = std::thread::scope(|scope| {
        let running = sides
            .each_ref()
            .map(|side| scope.spawn(move || side.load().map(fz_compiler::check)));
        running.map(|thread| thread.join())
    });
    let mut tables = [None, None];
    for ((side, checked), table) in sides.iter().zip(checked).zip(&mut tables) {
        let checked =
            checked.map_err(|_| anyhow::anyhow!("checking `{}` failed", side.label()))??;
        match checked.table {
            Some(checked) => *table = Some(checked),
            // A tree that is not there (a revision before the policies existed) allows nothing.
            None if checked.sources.is_empty() => *table = Some(fz_compiler::Table::default()),
            None => {
                let label = side.label();
                eprint!(
                    "{}",
                    report(&checked, Path::new(&label), ReportFormat::Human, None)
                );
                eprintln!("error: `{label}` has errors; no diff made");
            }
        }
    }
    let [Some(old), Some(new)] = tables else {
        return Ok(ExitCode::from(TREE_ERRORS));
    };
    let access = fz_compiler::diff::diff(&DecisionTable::new(old), &DecisionTable::new(new));
    print!("{}", diff::render(&access, format));
    Ok(match fail_on {
        Some(fail_on) if fail_on.hit(&access) => ExitCode::from(TREE_ERRORS),
        _ => ExitCode::SUCCESS,
    })
}

fn run_query(args: QueryArgs) -> anyhow::Result<ExitCode> {
    let decisions = if args.dir.is_file() {
        let bytes = std::fs::read(&args.dir)
            .with_context(|| format!("cannot read `{}`", args.dir.display()))?;
        let bundle = match Bundle::from_bytes(&bytes) {
            Ok(bundle) => bundle,
            Err(error) => {
                eprintln!("error: `{}`: {error}", args.dir.display());
                return Ok(ExitCode::from(TREE_ERRORS));
            }
        };
        DecisionTable::new(bundle.table)
    } else {
        let checked = check(&args.dir)?;
        let Some(table) = checked.table.clone() else {
            return Ok(refuse(&checked, &args.dir, args.format, "no decision made"));
        };
        DecisionTable::new(table)
    };

    let Some(path) = &args.requests else {
        let line = query::RequestLine {
            user: args.user.unwrap_or_default(),
            groups: args.groups,
            resource: args.resource.unwrap_or_default(),
            port: args.port,
            at: args.at,
            from: args.from,
            country: args.country,
            provider: args.provider,
            verified: args.verified,
        };
        let request = match line.into_request(&decisions) {
            Ok(request) => request,
            Err(message) => {
                eprintln!("error: {message}");
                return Ok(ExitCode::from(USAGE_OR_IO));
            }
        };
        let decision = decisions.decide(&request);
        match args.format {
            Format::Human => print!("{}", query::human(&request, &decision, &decisions)),
            Format::Json => println!(
                "{}",
                serde_json::to_string(&query::DecisionJson::new(&request, &decision, &decisions))?
            ),
        }
        return Ok(ExitCode::SUCCESS);
    };

    // Batch: one decision (or one error) per input line, so outputs line up with inputs.
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut bad_lines = 0usize;
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read `{}`", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<query::RequestLine>(&line)
            .map_err(|e| format!("{}:{}: {e}", path.display(), number + 1))
            .and_then(|r| {
                r.into_request(&decisions)
                    .map_err(|e| format!("{}:{}: {e}", path.display(), number + 1))
            });
        match parsed {
            Ok(request) => {
                let decision = decisions.decide(&request);
                serde_json::to_writer(
                    &mut out,
                    &query::DecisionJson::new(&request, &decision, &decisions),
                )?;
            }
            Err(message) => {
                bad_lines += 1;
                eprintln!("error: {message}");
                serde_json::to_writer(&mut out, &serde_json::json!({ "error": message }))?;
            }
        }
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(if bad_lines > 0 {
        ExitCode::from(USAGE_OR_IO)
    } else {
        ExitCode::SUCCESS
    })
}
