//! The example tree under `policies/` is the README's quick start: it must check clean, and
//! its compiled table is snapshotted so any change to what it means is reviewed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::path::Path;

fn example_bundle() -> fz_compiler::Bundle {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let checked = fz_compiler::check(fz_compiler::load_tree(&dir).expect("policies/ loads"));
    assert!(checked.diagnostics.is_empty(), "{:#?}", checked.diagnostics);
    fz_compiler::Bundle::new(checked.table.expect("a table")).expect("bundle")
}

#[test]
fn the_compiled_example_table() {
    let bundle = example_bundle();
    let text = String::from_utf8(bundle.to_bytes().expect("bytes")).expect("utf-8");
    insta::assert_snapshot!(text);
}

#[test]
fn the_bundle_reads_back_as_written() {
    let bundle = example_bundle();
    let bytes = bundle.to_bytes().expect("bytes");
    assert_eq!(
        fz_compiler::Bundle::from_bytes(&bytes).expect("reads"),
        bundle
    );
}

#[test]
fn bundles_of_another_format_or_kind_are_refused() {
    let bytes = example_bundle().to_bytes().expect("bytes");
    let text = String::from_utf8(bytes).expect("utf-8");
    let newer = text.replacen("\"version\": 2", "\"version\": 3", 1);
    // Version 1 tables do not file deny rules under the resources inside their targets.
    let older = text.replacen("\"version\": 2", "\"version\": 1", 1);
    let other = text.replacen("\"fz-bundle\"", "\"something-else\"", 1);
    for (input, expected) in [
        (newer, "format version 3; this build reads version 2 only"),
        (older, "format version 1; this build reads version 2 only"),
        (other, "not an fz bundle"),
        ("{".to_owned(), "not valid JSON"),
    ] {
        let error = fz_compiler::Bundle::from_bytes(input.as_bytes()).expect_err("refused");
        assert!(error.to_string().contains(expected), "{error}");
    }
}

#[test]
fn a_table_with_a_dangling_reference_is_refused_even_with_a_matching_hash() {
    let mut table = example_bundle().table;
    table.resources[0].allow.push(999);
    let bytes = fz_compiler::Bundle::new(table)
        .expect("bundle")
        .to_bytes()
        .expect("bytes");
    let error = fz_compiler::Bundle::from_bytes(&bytes).expect_err("refused");
    assert_eq!(
        error.to_string(),
        "the bundle's table is inconsistent: rule index 999 is out of range"
    );
}

#[test]
fn the_address_index_serves_the_most_specific_resource() {
    let table = fz_compiler::DecisionTable::new(example_bundle().table);
    let by_name = |name: &str| table.resource_for_name(name).map(|r| r.id.as_str());
    let by_ip = |ip: &str| {
        table
            .resource_for_ip(ip.parse().expect("ip"))
            .map(|r| r.id.as_str())
    };
    let names = [
        ("GitLab.acme.example.", Some("gitlab")),
        ("runner7.ci.acme.example", Some("ci-runners")),
        ("runner12.ci.acme.example", None),
        ("wiki.acme.example", Some("wiki")),
        ("eng.space.wiki.acme.example", Some("wiki")),
        ("mr-42.preview.acme.example", Some("previews")),
        ("preview.acme.example", None),
        ("example.org", None),
    ];
    for (name, expected) in names {
        assert_eq!(by_name(name), expected, "{name}");
    }
    let ips = [
        ("10.20.5.77", Some("prod-db")),
        ("10.20.0.10", Some("bastion")),
        // A private address no resource declares: `internet` is public addresses only.
        ("10.20.0.11", None),
        ("fd00:20:6::1", Some("prod-db-us")),
        ("fd00:20::10", Some("bastion-us")),
        ("fd00:20::11", None),
        ("192.168.100.1", Some("admin-net")),
        ("8.8.8.8", Some("egress")),
        ("2606:4700::1111", Some("egress")),
    ];
    for (ip, expected) in ips {
        assert_eq!(by_ip(ip), expected, "{ip}");
    }
}
