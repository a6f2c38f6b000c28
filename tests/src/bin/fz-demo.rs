//! `fz-demo`: the end-to-end world (`fz_e2e::world`) for a person to watch. It builds the
//! topology, narrates each step (the client's token, the policy check, default deny, a rule
//! added, a DNS answer with mapped addresses, curl through the tunnel, a denial, a failover
//! with its measured time) and cleans up, also when a step fails. Needs root:
//!
//! ```console
//! $ cargo build --bins && sudo target/debug/fz-demo
//! ```
// A demo talks to its reader on standard output; a failed step panics with what went wrong.
#![allow(clippy::print_stdout, clippy::expect_used)]

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use fz_e2e::binaries::binary;
use fz_e2e::world::{DB, GATEWAYS, Outage, World};
use fz_host::testing::WAIT;

fn main() -> ExitCode {
    if let Some(why) = fz_host::testing::not_root() {
        println!("fz-demo needs root (network namespaces, TUN devices, nftables): {why}");
        return ExitCode::from(2);
    }
    if let Some(tool) = fz_e2e::world::missing_tool() {
        println!(
            "fz-demo needs `{tool}` (apt-get install iproute2 nftables dnsutils curl dnsmasq-base)"
        );
        return ExitCode::from(2);
    }

    step(
        "Building the world: fz-portal, gateways gw-a and gw-b at site hq and gw-c at site lab, \
         and fz-client, each in a network namespace; behind hq an HTTPS server at 172.16.0.5 \
         (gitlab, jenkins and docs.company.com), a database at 10.0.5.10:5432, a build \
         server at 10.0.6.10:8080 and the DNS server for company.com, which only the gateways \
         reach",
    );
    let started = Instant::now();
    let mut world = match World::new() {
        Ok(world) => world,
        Err(why) => {
            println!("cannot build the world here: {why}");
            return ExitCode::FAILURE;
        }
    };
    say(&format!("up in {:.1} s", started.elapsed().as_secs_f64()));

    step(
        "Signed in: the client runs with a token the admin made \
         (`fz-portal token create --client laptop --user alice@acme.example`); \
         the portal has every gateway connected",
    );
    say(&world.admin(&["gateways", "--account", "acme"]));

    step(
        "The policy tree: sites, resources (some inside others), two groups and one guardrail \
         (a tree needs a rule), and no allow rule yet. `fzc check`, one line per diagnostic:",
    );
    say(&fzc_check(&world));

    step("Default deny: curl https://gitlab.company.com from the client");
    match world.curl("gitlab.company.com", "/", &[]) {
        Ok(fetched) => say(&format!("unexpected: {fetched:?}")),
        Err(error) => say(error.trim()),
    }
    say(&format!("the portal's flow log: {}", newest_flow(&world)));

    let rule = "allow engineering -> gitlab, docs, db as eng";
    step(&format!(
        "An admin adds `{rule}` to the tree; `fzc check` passes and the portal reloads it"
    ));
    world.set_rules(rule);
    say(&fzc_check(&world));
    say(&format!("the portal serves bundle {}", world.bundle_hash()));

    step("DNS: `dig gitlab.company.com` in the client's namespace");
    // The client remembers the refusal of a moment ago for a few seconds.
    let mapped = world.wait_for("gitlab's mapped addresses", WAIT, |world| {
        let answer = world.dig(&["gitlab.company.com", "A"]);
        (!answer.is_empty()).then_some(answer)
    });
    say(&format!(
        "{} (mapped addresses from 100.96.0.0/11: the gateway resolved the real name)",
        mapped.join(" ")
    ));

    step("curl https://gitlab.company.com through the tunnel");
    let page = world
        .curl("gitlab.company.com", "/", &[])
        .expect("curl through the tunnel reaches gitlab");
    say(&format!(
        "{:?} in {:.0} ms (the server sees the gateway's address)",
        page.body,
        page.first_byte.as_secs_f64() * 1000.0
    ));

    step("A denial: jenkins.company.com is on the same server, and no rule allows it");
    let jenkins = world.dig(&["jenkins.company.com", "A"]);
    say(&format!(
        "dig: {jenkins:?} (an empty answer: policy says no)"
    ));
    say(&format!("the portal's flow log: {}", newest_flow(&world)));

    step("Failover: kill the gateway that carries the client's connections to db");
    let failover = world.fail_over(DB, Duration::from_secs(30), Outage::Crash);
    say(&format!(
        "{} killed; db answered through {} {:.2} s later ({} attempts); the portal shows:",
        GATEWAYS[failover.dead].name,
        GATEWAYS[failover.alive].name,
        failover.took.as_secs_f64(),
        failover.attempts
    ));
    say(&world.admin(&["gateways", "--account", "acme"]));

    step("Cleaning up");
    drop(world);
    say("every process stopped; namespaces, nftables tables and files removed");
    ExitCode::SUCCESS
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn say(text: &str) {
    for line in text.trim_end().lines() {
        println!("    {line}");
    }
}

/// `fzc check` of the world's tree, whatever the outcome: the first line of each diagnostic
/// (the report goes on with the source line, a caret, notes and help) and the summary.
fn fzc_check(world: &World) -> String {
    let output = Command::new(binary("fzc"))
        .arg("check")
        .arg(world.tree())
        .output()
        .expect("fzc runs");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    report
        .lines()
        .filter(|line| {
            line.starts_with("warning[")
                || line.starts_with("error[")
                || line.contains(" checked, ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The newest flow record: who, what, the decision and why.
fn newest_flow(world: &World) -> String {
    let flows = world.flows();
    let Some(flow) = flows.first() else {
        return "empty".to_owned();
    };
    format!(
        "{} -> {}: {} ({})",
        flow["user"].as_str().unwrap_or_default(),
        flow["resource_id"].as_str().unwrap_or_default(),
        flow["decision"].as_str().unwrap_or_default(),
        flow["reason"].as_str().unwrap_or_default()
    )
}
