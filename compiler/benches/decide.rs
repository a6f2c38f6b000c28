//! Decision latency: fz's `DecisionTable::decide` against Cedar's `Authorizer::is_authorized`,
//! side by side, on the same generated policies and requests at 100, 1k, 10k and 100k rules.
//!
//! Why: fz files rules under the resources they reach, so a decision reads a handful of rules
//! whatever the size of the tree, where Cedar evaluates every policy on every request. The
//! goals: 1000x faster than Cedar at 1k rules, under 1 us at 100k, and at most 2x growth from
//! 100 to 100k rules.
//!
//! Two groups per size, one per language the rules are authored in:
//! - `decide/RULES`: an fz tree; Cedar evaluates the same rules rendered as Cedar policies.
//! - `decide-cedar/RULES`: the rules written as `.cedar` files beside the fz declarations; fz
//!   compiles that mixed tree, and Cedar parses and evaluates the very texts of its `.cedar`
//!   files, the same policies as the other group's Cedar side.
//!
//! What is timed: for fz, `decide(&Request)` with names as strings, so building the user's
//! group membership from the identity provider's group names is included; for Cedar, a
//! prebuilt `Request` against prebuilt `Entities` (users whose parents are their groups,
//! resources whose parent is their site). Both cycle through one fixed pool of requests with a
//! mix of allow and deny outcomes. Before anything is timed, both sides decide every request of
//! the pool and the bench aborts if they disagree once or Cedar reports an error.
//!
//! Run by hand (`cargo bench -p fz-compiler --bench decide`); `FZ_BENCH_RULES=100,1000` picks
//! sizes and a criterion filter picks groups (`-- decide-cedar`): a group's trees are built
//! only when one of its benchmarks runs. Besides criterion's report it prints one summary line
//! per group, from a plain timing loop over the pool, and fz's growth per language. In test
//! mode (`cargo test --benches`) only the 100-rule size is set up.
//!
//! A third group, `verify`, times `fz_compiler::check` (parsing, resolving, analysing, tests
//! and invariants) on trees whose invariants rest on time windows: the invariant search goes
//! through every combination of windows open and closed in the zones the rules name
//! (`cargo bench -p fz-compiler --bench decide -- verify`, under a minute).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "common/workload.rs"]
mod workload;

use std::cell::{LazyCell, RefCell};
use std::collections::HashSet;
use std::hint::black_box;
use std::str::FromStr;
use std::time::{Duration, Instant};

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityUid, PolicySet, RestrictedExpression,
};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use fz_compiler::condition::Context as FzContext;
use fz_compiler::table::{Effect, PortRange};
use fz_compiler::{DecisionTable, Request};
use fz_lang::{SourceFile, Sources};
use workload::{POOL, PORT, Probe, RulesIn, Workload};

const SIZES: [usize; 4] = [100, 1_000, 10_000, 100_000];

/// Cedar takes tens of milliseconds per decision from 10k rules up: fewer, flat samples there.
const LARGE: usize = 10_000;

/// The fz side: the table as the portal loads it, and the pool as the portal receives it.
struct Fz {
    table: DecisionTable,
    requests: Vec<Request>,
}

impl Fz {
    fn new(workload: &Workload, tree: &[(String, String)]) -> Fz {
        let files = tree
            .iter()
            .map(|(path, text)| SourceFile::new(path.as_str(), text.as_str()))
            .collect();
        let checked = fz_compiler::check(Sources::new(files));
        assert!(
            !checked.has_errors(),
            "the generated tree has errors: {:#?}",
            checked.diagnostics
        );
        let warnings = checked.diagnostics.len();
        if warnings > 0 {
            println!("the generated tree has {warnings} warnings");
        }
        let requests = workload
            .requests
            .iter()
            .map(|probe| fz_request(workload, probe))
            .collect();
        Fz {
            table: DecisionTable::new(checked.table.expect("a tree without errors has a table")),
            requests,
        }
    }

    fn allows(&self, i: usize) -> bool {
        self.table.decide(&self.requests[i]).effect == Effect::Allow
    }

    /// Mean fz time over a pool of `WIDE_POOL` requests spread over every user and resource:
    /// its working set does not fit in cache at 100k rules, as a portal's traffic would not.
    fn wide_pool_ns(&self, workload: &Workload) -> f64 {
        let facts = workload.requests[0].facts;
        let requests: Vec<Request> = (0..WIDE_POOL)
            .map(|k| {
                let probe = Probe {
                    user: k * 7_919 % workload.users.len(),
                    resource: k * 104_729 % workload.resources.len(),
                    facts,
                };
                fz_request(workload, &probe)
            })
            .collect();
        let start = Instant::now();
        let mut passes = 0;
        while passes == 0 || start.elapsed() < Duration::from_secs(2) {
            for request in &requests {
                black_box(self.table.decide(black_box(request)));
            }
            passes += 1;
        }
        start.elapsed().as_nanos() as f64 / (passes * WIDE_POOL) as f64
    }
}

/// The fz request for a probe: user, identity-provider groups and resource by name.
fn fz_request(workload: &Workload, probe: &Probe) -> Request {
    let user = workload.users.get(probe.user).unwrap();
    Request {
        user: user.email.clone(),
        groups: user
            .groups
            .iter()
            .map(|&g| workload.groups.get(g).unwrap().clone())
            .collect(),
        resource: workload.resources.get(probe.resource).unwrap().id.clone(),
        port: Some(PortRange::from_str(PORT).unwrap()),
        context: FzContext {
            at: None,
            source: Some(probe.facts.source.into()),
            country: Some(probe.facts.country.to_owned()),
            provider: Some(probe.facts.provider.to_owned()),
            verified: probe.facts.verified,
        },
    }
}

/// Requests in the wide, fz-only pool.
const WIDE_POOL: usize = 16_384;

/// The Cedar side: the same rules as policies, users and resources as entities.
struct Cedar {
    authorizer: Authorizer,
    policies: PolicySet,
    entities: Entities,
    requests: Vec<cedar_policy::Request>,
}

impl Cedar {
    fn new(workload: &Workload, policies: PolicySet) -> Cedar {
        let groups: Vec<EntityUid> = workload.groups.iter().map(|g| uid("Group", g)).collect();
        let sites: Vec<EntityUid> = workload.sites.iter().map(|s| uid("Site", s)).collect();
        let parents = |uids: &[EntityUid], indexes: &[usize]| -> HashSet<EntityUid> {
            indexes.iter().map(|&i| uids[i].clone()).collect()
        };
        let entities =
            groups
                .iter()
                .chain(&sites)
                .map(|uid| Entity::new_no_attrs(uid.clone(), HashSet::new()))
                .chain(workload.users.iter().map(|u| {
                    Entity::new_no_attrs(uid("User", &u.email), parents(&groups, &u.groups))
                }))
                .chain(workload.resources.iter().map(|r| {
                    Entity::new_no_attrs(uid("Resource", &r.id), parents(&sites, &[r.site]))
                }));
        let entities = Entities::from_entities(entities, None).unwrap();
        let requests = workload
            .requests
            .iter()
            .map(|probe| Cedar::request(workload, probe))
            .collect();
        Cedar {
            authorizer: Authorizer::new(),
            policies,
            entities,
            requests,
        }
    }

    fn request(workload: &Workload, probe: &Probe) -> cedar_policy::Request {
        let facts = probe.facts;
        let context = Context::from_pairs([
            (
                "country".to_owned(),
                RestrictedExpression::new_string(facts.country.to_owned()),
            ),
            (
                "source_ip".to_owned(),
                RestrictedExpression::new_ip(facts.source.to_string()),
            ),
            (
                "provider".to_owned(),
                RestrictedExpression::new_string(facts.provider.to_owned()),
            ),
            (
                "client_verified".to_owned(),
                RestrictedExpression::new_bool(facts.verified),
            ),
        ])
        .unwrap();
        cedar_policy::Request::new(
            uid("User", &workload.users[probe.user].email),
            uid("Action", "connect"),
            uid("Resource", &workload.resources[probe.resource].id),
            context,
            None,
        )
        .unwrap()
    }

    fn response(&self, i: usize) -> cedar_policy::Response {
        self.authorizer
            .is_authorized(&self.requests[i], &self.policies, &self.entities)
    }

    fn allows(&self, i: usize) -> bool {
        self.response(i).decision() == cedar_policy::Decision::Allow
    }
}

/// What Cedar evaluates beside a tree whose rules are written in `rules_in`: for an fz tree, its
/// rules rendered as Cedar; for a Cedar-authored tree, the texts of its `.cedar` files, parsed
/// by Cedar as they stand.
fn cedar_policies(workload: &Workload, rules_in: RulesIn, tree: &[(String, String)]) -> PolicySet {
    match rules_in {
        RulesIn::Fz => PolicySet::from_str(&workload.cedar_policies()).unwrap(),
        RulesIn::Cedar => {
            let mut set = PolicySet::new();
            for (path, text) in tree.iter().filter(|(path, _)| path.ends_with(".cedar")) {
                let file = PolicySet::from_str(text)
                    .unwrap_or_else(|errors| panic!("{path}: Cedar does not parse it: {errors}"));
                // Each file's policies are numbered from `policy0`: renamed apart in the merge.
                set.merge(&file, true).unwrap();
            }
            set
        }
    }
}

fn uid(kind: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(kind.parse().unwrap(), cedar_policy::EntityId::new(id))
}

/// Both sides decide every request of the pool; panics (aborting the bench) on the first
/// disagreement or Cedar evaluation error. Returns how many requests are allowed.
fn assert_agreement(rules: usize, fz: &Fz, cedar: &Cedar) -> usize {
    let mut allowed = 0;
    for i in 0..POOL {
        let response = cedar.response(i);
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect();
        assert!(
            errors.is_empty(),
            "rules={rules} request {i}: Cedar errors {errors:?}"
        );
        let cedar_allows = response.decision() == cedar_policy::Decision::Allow;
        assert_eq!(
            fz.allows(i),
            cedar_allows,
            "rules={rules}: fz and Cedar disagree on {:?}",
            fz.requests[i]
        );
        allowed += usize::from(cedar_allows);
    }
    allowed
}

/// Mean time per decision over whole passes of the pool, for at least `budget` and one pass.
fn mean_ns(budget: Duration, decide: impl Fn(usize) -> bool) -> f64 {
    let start = Instant::now();
    let mut passes = 0;
    while passes == 0 || start.elapsed() < budget {
        for i in 0..POOL {
            black_box(decide(black_box(i)));
        }
        passes += 1;
    }
    start.elapsed().as_nanos() as f64 / (passes * POOL) as f64
}

/// One policy set as both sides hold it, checked to agree on the whole pool.
struct Sides {
    fz: Fz,
    cedar: Cedar,
}

impl Sides {
    /// Builds both sides, asserts they agree, prints the summary lines from plain timing loops
    /// and records fz's time in `growth`.
    fn new(
        workload: &Workload,
        rules: usize,
        rules_in: RulesIn,
        growth: &RefCell<Vec<(RulesIn, usize, f64)>>,
    ) -> Sides {
        let tree = workload.tree(rules_in);
        let fz = Fz::new(workload, &tree);
        let cedar = Cedar::new(workload, cedar_policies(workload, rules_in, &tree));
        let allowed = assert_agreement(rules, &fz, &cedar);
        let policies = cedar.policies.num_of_policies();
        let authored = rules_in.name();

        let fz_ns = mean_ns(Duration::from_secs(1), |i| fz.allows(i));
        let cedar_ns = mean_ns(Duration::from_secs(1), |i| cedar.allows(i));
        println!(
            "rules={rules} authored={authored} policies={policies} fz={fz_ns:.0} ns \
             cedar={cedar_ns:.0} ns ratio={:.0}x (pool {POOL}, {allowed} allowed)",
            cedar_ns / fz_ns
        );
        println!(
            "rules={rules} authored={authored} fz wide pool of {WIDE_POOL}: {:.0} ns",
            fz.wide_pool_ns(workload)
        );
        growth.borrow_mut().push((rules_in, rules, fz_ns));
        Sides { fz, cedar }
    }
}

/// Criterion's group for one size and language; the fz-authored one keeps its first name.
fn group_name(rules_in: RulesIn, rules: usize) -> String {
    match rules_in {
        RulesIn::Fz => format!("decide/{rules}"),
        RulesIn::Cedar => format!("decide-cedar/{rules}"),
    }
}

/// Criterion runs one decision per iteration, walking the pool. The sides are built the first
/// time a benchmark of theirs runs, outside the timing.
fn bench_side(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    sides: &LazyCell<Sides, impl FnOnce() -> Sides>,
    decide: impl Fn(&Sides, usize) -> bool,
) {
    group.bench_function(name, |b| {
        let sides = LazyCell::force(sides);
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % POOL;
            decide(sides, i)
        });
    });
}

fn sizes() -> Vec<usize> {
    if let Ok(list) = std::env::var("FZ_BENCH_RULES") {
        return list
            .split(',')
            .map(|n| {
                n.trim()
                    .replace('_', "")
                    .parse()
                    .expect("FZ_BENCH_RULES: numbers")
            })
            .collect();
    }
    // `cargo bench` passes `--bench`; without it criterion runs each benchmark once as a test.
    if std::env::args().any(|a| a == "--bench") {
        SIZES.to_vec()
    } else {
        SIZES[..1].to_vec()
    }
}

fn decide(c: &mut Criterion) {
    let growth = RefCell::new(Vec::new());
    for rules in sizes() {
        let workload = LazyCell::new(|| Workload::generate(rules));
        for rules_in in [RulesIn::Fz, RulesIn::Cedar] {
            let sides = LazyCell::new(|| Sides::new(&workload, rules, rules_in, &growth));
            let mut group = c.benchmark_group(group_name(rules_in, rules));
            bench_side(&mut group, "fz", &sides, |sides, i| sides.fz.allows(i));
            if rules >= LARGE {
                group
                    .sampling_mode(SamplingMode::Flat)
                    .sample_size(10)
                    .warm_up_time(Duration::from_secs(1))
                    .measurement_time(Duration::from_secs(rules as u64 / 5_000));
            }
            bench_side(&mut group, "cedar", &sides, |sides, i| {
                sides.cedar.allows(i)
            });
            group.finish();
        }
    }
    for rules_in in [RulesIn::Fz, RulesIn::Cedar] {
        let times: Vec<(usize, f64)> = growth
            .borrow()
            .iter()
            .filter(|(language, ..)| *language == rules_in)
            .map(|&(_, rules, ns)| (rules, ns))
            .collect();
        if let [(small, first), .., (large, last)] = times.as_slice() {
            println!(
                "fz growth authored={} rules={small}->{large}: {:.2}x ({first:.0} ns -> {last:.0} ns)",
                rules_in.name(),
                last / first
            );
        }
    }
}

/// Zones of the `verify` group's tree: clock changes on different days in both hemispheres,
/// half-hour and 45-minute offsets, a half-hour summer time, and zones without clock changes.
const ZONES: [&str; 8] = [
    "Europe/Berlin",
    "America/New_York",
    "Australia/Sydney",
    "Asia/Kolkata",
    "America/St_Johns",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Asia/Kathmandu",
];

/// Resources of the `verify` group's tree, each with its own three zones.
const TIMED_RESOURCES: usize = 16;

/// A tree whose invariants hold and whose rules have time windows in three zones per resource:
/// the invariant search decides every representative context of every resource. Staff work
/// office hours in one zone, on-call nights in another, and both are off at weekends in a
/// third; contractors are always denied. `never contractors` and `only staff, oncall` hold.
fn time_zone_tree() -> String {
    let mut text = String::from(
        "site hq\n\
         group staff { idp okta \"Staff\" }\n\
         group oncall { idp okta \"On call\" }\n\
         group contractors { idp okta \"Contractors\" }\n",
    );
    let mut resources = Vec::new();
    for i in 0..TIMED_RESOURCES {
        let zone = |k: usize| ZONES[(i + k) % ZONES.len()];
        let (office, night, weekend) = (zone(0), zone(3), zone(5));
        text += &format!(
            "resource r{i} {{ address \"r{i}.corp.example\"; site hq }}\n\
             allow staff -> r{i} when time mon-fri 08:00-12:30, 13:15-18:00 {office}\n\
             allow oncall -> r{i} when time any 18:00-08:00 {night}\n\
             deny staff, oncall -> r{i} when time sat,sun 00:00-24:00 {weekend}\n\
             deny contractors -> r{i}\n"
        );
        resources.push(format!("r{i}"));
    }
    let resources = resources.join(", ");
    text += &format!(
        "assert never contractors -> {resources}\nassert only staff, oncall -> {resources}\n"
    );
    text
}

/// `fz_compiler::check` as `fzc check` runs it, on trees whose invariants rest on time
/// windows: `verify/time-zones` (the tree above) and `verify/example` (the example tree,
/// `policies/`, one zone).
fn verify(c: &mut Criterion) {
    let example = fz_compiler::load_tree(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"),
    )
    .unwrap();
    let zones = Sources::new(vec![SourceFile::new("zones.fz", time_zone_tree())]);
    for (name, sources) in [("time-zones", zones), ("example", example)] {
        let checked = fz_compiler::check(sources.clone());
        let errors: Vec<_> = checked
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:#?}");
        println!(
            "verify/{name}: tests and invariants {} passed, {} failed",
            checked.tests.passed, checked.tests.failed
        );
        let mut group = c.benchmark_group("verify");
        group.bench_function(name, |b| {
            b.iter(|| fz_compiler::check(black_box(sources.clone())))
        });
        group.finish();
    }
}

criterion_group!(benches, decide, verify);
criterion_main!(benches);
