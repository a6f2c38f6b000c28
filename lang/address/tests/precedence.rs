//! Precedence and containment of addresses, held against brute force over a small world of
//! names: the order that decides which resource serves a name is total, an address inside
//! another always wins over it, and the index picks what the order says whatever ids the
//! resources carry.

use std::collections::BTreeSet;

use fz_address::{Address, AddressIndex, NamePattern, overlapping_pairs};
use proptest::prelude::*;

/// Labels patterns and names are made of: short ones, so that `?` and `*` meet literal
/// labels of their length and others.
const LITERALS: [&str; 5] = ["a", "b", "ab", "ba", "abc"];
const WILD: [&str; 5] = ["*", "?", "a?", "?b", "??"];

fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(LITERALS.to_vec()),
        2 => proptest::sample::select(WILD.to_vec()),
    ]
    .prop_map(str::to_owned)
}

/// A pattern under the top-level domain `x`, possibly led by `**`.
fn pattern() -> impl Strategy<Value = NamePattern> {
    (any::<bool>(), proptest::collection::vec(label(), 0..3)).prop_filter_map(
        "a pattern needs a label besides the top-level domain",
        |(any_depth, labels)| {
            let mut parts: Vec<String> = Vec::new();
            if any_depth {
                parts.push("**".to_owned());
            }
            parts.extend(labels);
            if parts.is_empty() {
                return None;
            }
            parts.push("x".to_owned());
            NamePattern::parse(&parts.join(".")).ok()
        },
    )
}

/// Labels of the names tried: every label of one and two characters over `a`, `b` and a
/// letter no pattern writes, and two of three, so that every `?` and `*` of a pattern meets
/// a label it matches and one a literal would not.
const NAME_LABELS: [&str; 14] = [
    "a", "b", "c", "aa", "ab", "ac", "ba", "bb", "bc", "ca", "cb", "cc", "abc", "ccc",
];

/// Every name of up to three labels below `x`: patterns have at most two labels below `x`
/// besides a leading `**`, so one more label tells any two of them apart.
fn names() -> Vec<String> {
    let mut names = vec!["x".to_owned()];
    let mut frontier = vec!["x".to_owned()];
    for _ in 0..3 {
        let mut next = Vec::new();
        for suffix in &frontier {
            for label in NAME_LABELS {
                next.push(format!("{label}.{suffix}"));
            }
        }
        names.extend(next.iter().cloned());
        frontier = next;
    }
    names
}

fn matched(pattern: &NamePattern, names: &[String]) -> BTreeSet<usize> {
    (0..names.len())
        .filter(|i| names.get(*i).is_some_and(|n| pattern.matches(n)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn containment_and_precedence_agree_with_the_names_patterns_match(
        a in pattern(),
        b in pattern(),
    ) {
        let names = names();
        let (in_a, in_b) = (matched(&a, &names), matched(&b, &names));
        let (address_a, address_b) = (Address::Name(a.clone()), Address::Name(b.clone()));
        // Inside means every name of one is a name of the other (and they differ).
        prop_assert_eq!(
            address_a.lies_inside(&address_b),
            a != b && in_a.is_subset(&in_b),
            "{} inside {}", a.as_str(), b.as_str()
        );
        prop_assert_eq!(a.overlaps(&b), !in_a.is_disjoint(&in_b), "{} overlaps {}", a.as_str(), b.as_str());
        if a != b {
            // One order for ties: of two distinct patterns exactly one wins.
            prop_assert!(address_a.wins_over(&address_b) != address_b.wins_over(&address_a));
        }
        if address_a.lies_inside(&address_b) {
            prop_assert!(address_a.wins_over(&address_b), "{} lies inside {} but loses", a.as_str(), b.as_str());
        }
    }

    #[test]
    fn the_index_picks_the_winner_whatever_the_ids(
        patterns in proptest::collection::btree_set(pattern().prop_map(|p| p.as_str().to_owned()), 1..8),
        rotation in 0usize..8,
    ) {
        let addresses: Vec<Address> = patterns
            .iter()
            .filter_map(|p| Address::parse_quoted(p).ok())
            .collect();
        // The same addresses under ids in another order.
        let count = addresses.len();
        let ids: Vec<usize> = (0..count).map(|i| (i + rotation) % count).collect();
        let index = AddressIndex::new(addresses.iter().zip(ids.iter().copied()));
        // The pairs found through suffixes are every overlapping pair, winner first.
        let mut expected_pairs = Vec::new();
        for (i, a) in addresses.iter().enumerate() {
            for (j, b) in addresses.iter().enumerate() {
                if i != j && a.overlaps(b) && a.wins_over(b) {
                    expected_pairs.push((i, j));
                }
            }
        }
        let refs: Vec<&Address> = addresses.iter().collect();
        prop_assert_eq!(overlapping_pairs(&refs), expected_pairs);
        for name in names() {
            let matching: Vec<usize> = (0..count)
                .filter(|i| addresses.get(*i).is_some_and(|a| matches!(a, Address::Name(p) if p.matches(&name))))
                .collect();
            let expected = matching.iter().copied().find(|i| {
                matching.iter().all(|j| {
                    i == j || addresses.get(*i).zip(addresses.get(*j)).is_some_and(|(a, b)| a.wins_over(b))
                })
            });
            prop_assert_eq!(
                index.lookup_name(&name),
                expected.and_then(|i| ids.get(i).copied()),
                "{}", name
            );
        }
    }
}
