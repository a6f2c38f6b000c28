#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `CountryDb` against MaxMind DB files written by `support::mmdb`.

mod support;

use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;

use fz_portal::geo::{CountryDb, GeoError};
use support::mmdb::{self, MmdbWriter, Value};
use tempfile::NamedTempFile;

/// A /16 and a /24 inside it (given first, so the /16 must not swallow it), and an IPv6 /32.
const NETWORKS: &[(&str, &str)] = &[
    ("198.51.100.0/24", "DE"),
    ("198.51.0.0/16", "FR"),
    ("2001:db8::/32", "US"),
];

/// Address, country expected with `NETWORKS`.
const LOOKUPS: &[(&str, Option<&str>)] = &[
    ("198.51.100.7", Some("DE")),
    ("198.51.100.0", Some("DE")),
    ("198.51.100.255", Some("DE")),
    ("198.51.99.255", Some("FR")),
    ("198.51.101.0", Some("FR")),
    ("198.51.0.0", Some("FR")),
    ("198.51.255.255", Some("FR")),
    ("198.50.255.255", None),
    ("198.52.0.0", None),
    ("203.0.113.9", None),
    ("255.255.255.255", None),
    ("0.0.0.0", None),
    // IPv4-mapped: what a dual-stack socket reports for an IPv4 peer.
    ("::ffff:198.51.100.7", Some("DE")),
    ("::ffff:198.51.1.1", Some("FR")),
    ("::ffff:203.0.113.9", None),
    // IPv4-compatible: where the tree keeps IPv4.
    ("::198.51.100.7", Some("DE")),
    ("2001:db8::1", Some("US")),
    ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", Some("US")),
    ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("2001:db9::", None),
    ("::1", None),
    ("::", None),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
];

#[test]
fn lookups_find_the_most_specific_network_in_every_record_size() {
    for record_size in [24, 28, 32] {
        let writer = NETWORKS.iter().fold(
            MmdbWriter::new().record_size(record_size),
            |w, (cidr, code)| w.insert(cidr, mmdb::country(code)),
        );
        let db = open(&writer.build()).unwrap();
        for (address, expected) in LOOKUPS {
            let ip: IpAddr = address.parse().unwrap();
            assert_eq!(
                db.country(ip).as_deref(),
                *expected,
                "{address} with {record_size}-bit records"
            );
        }
    }
}

#[test]
fn the_database_is_read_once_and_outlives_its_file() {
    let file = temp_file(&mmdb::country_db(NETWORKS));
    let db = CountryDb::open(file.path()).unwrap();
    drop(file);
    assert_eq!(country(&db, "198.51.100.7"), Some("DE".to_owned()));
}

#[test]
fn the_code_comes_from_the_country_else_the_registered_country() {
    let names = || Value::map([("names", Value::map([("en", Value::string("Germany"))]))]);
    let code = |code: &str| Value::map([("iso_code", Value::string(code))]);
    let db = MmdbWriter::new()
        .insert("10.0.0.0/24", mmdb::country("de"))
        .insert(
            "10.0.1.0/24",
            Value::map([("registered_country", code("AT"))]),
        )
        .insert(
            "10.0.2.0/24",
            Value::map([("country", code("CH")), ("registered_country", code("AT"))]),
        )
        .insert(
            "10.0.3.0/24",
            Value::map([("country", names()), ("registered_country", code("at"))]),
        )
        .insert("10.0.4.0/24", Value::map([("country", names())]))
        .insert("10.0.5.0/24", mmdb::country(""))
        .insert("10.0.6.0/24", mmdb::country("DEU"))
        .insert(
            "10.0.7.0/24",
            Value::map([("country", Value::map([("iso_code", Value::Uint32(276))]))]),
        )
        .insert(
            "10.0.8.0/24",
            Value::map([("country", Value::string("DE"))]),
        )
        .insert("10.0.9.0/24", Value::string("DE"))
        .insert("10.0.10.0/24", Value::map([]))
        .insert(
            "10.0.11.0/24",
            Value::map([("country", code("XYZ")), ("registered_country", code("AT"))]),
        )
        .build();
    let db = open(&db).unwrap();
    for (address, expected) in [
        ("10.0.0.1", Some("DE")),
        ("10.0.1.1", Some("AT")),
        ("10.0.2.1", Some("CH")),
        ("10.0.3.1", Some("AT")),
        ("10.0.4.1", None),
        ("10.0.5.1", None),
        ("10.0.6.1", None),
        ("10.0.7.1", None),
        ("10.0.8.1", None),
        ("10.0.9.1", None),
        ("10.0.10.1", None),
        ("10.0.11.1", Some("AT")),
    ] {
        assert_eq!(country(&db, address).as_deref(), expected, "{address}");
    }
}

#[test]
fn city_and_dbip_databases_are_country_databases_too() {
    for database_type in [
        "GeoLite2-Country",
        "GeoIP2-Country",
        "GeoLite2-City",
        "GeoIP2-Enterprise",
        "DBIP-Country-Lite",
        "DBIP-City-Lite",
    ] {
        let bytes = MmdbWriter::new()
            .database_type(database_type)
            .insert("192.0.2.0/24", mmdb::country("NL"))
            .build();
        let db = open(&bytes).unwrap();
        assert_eq!(
            country(&db, "192.0.2.1").as_deref(),
            Some("NL"),
            "{database_type}"
        );
    }
}

#[test]
fn files_that_are_no_country_database_are_refused_with_their_path() {
    let asn = MmdbWriter::new()
        .database_type("GeoLite2-ASN")
        .insert(
            "192.0.2.0/24",
            Value::map([("autonomous_system_number", Value::Uint32(64_496))]),
        )
        .build();
    let good = mmdb::country_db(NETWORKS);
    let mut no_marker = good.clone();
    // The last byte of the metadata marker's `MaxMind.com`.
    let marker_end = good.windows(11).rposition(|w| w == b"MaxMind.com").unwrap() + 10;
    no_marker[marker_end] = b'x';

    for (bytes, expected) in [
        (&b""[..], "is not a MaxMind DB file"),
        (b"not a database\n", "is not a MaxMind DB file"),
        (&[0; 4096], "is not a MaxMind DB file"),
        (&good[..good.len() / 2], "is not a MaxMind DB file"),
        (&no_marker, "is not a MaxMind DB file"),
        (b"\xAB\xCD\xEFMaxMind.com", "is not a MaxMind DB file"),
        (
            &asn,
            "holds no country data: its database type is `GeoLite2-ASN`",
        ),
    ] {
        let file = temp_file(bytes);
        let message = CountryDb::open(file.path()).unwrap_err().to_string();
        assert!(message.contains(expected), "{message}");
        assert_names(&message, file.path());
    }
}

#[test]
fn a_path_that_cannot_be_read_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("GeoLite2-Country.mmdb");
    for path in [missing.as_path(), dir.path()] {
        let error = CountryDb::open(path).unwrap_err();
        assert!(matches!(error, GeoError::Read { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.starts_with("cannot read the country database"),
            "{message}"
        );
        assert_names(&message, path);
    }
}

/// Every single-byte change and every truncation of a valid file either fails to open or
/// answers lookups; none panics.
#[test]
fn damaged_databases_never_panic() {
    let good = mmdb::country_db(NETWORKS);
    let mut damaged: Vec<Vec<u8>> = (0..good.len()).map(|end| good[..end].to_vec()).collect();
    for at in 0..good.len() {
        for flip in [0x01, 0x80, 0xFF] {
            let mut bytes = good.clone();
            bytes[at] ^= flip;
            damaged.push(bytes);
        }
    }
    let file = NamedTempFile::new().unwrap();
    for bytes in damaged {
        std::fs::write(file.path(), &bytes).unwrap();
        let Ok(db) = CountryDb::open(file.path()) else {
            continue;
        };
        for (address, _) in LOOKUPS {
            let _ = db.country(address.parse().unwrap());
        }
    }
}

/// Past 16 MiB of data, record values need more than 24 bits: the top nibble of a 28-bit
/// record lives in the node's middle byte.
#[test]
fn records_beyond_24_bits_point_at_the_right_data() {
    let filler = Value::String("x".repeat(16_800_000));
    for record_size in [28, 32] {
        let bytes = MmdbWriter::new()
            .record_size(record_size)
            .insert("192.0.2.0/24", filler.clone())
            .insert("198.51.100.0/24", mmdb::country("DE"))
            .insert("2001:db8::/32", mmdb::country("US"))
            .build();
        let reader = maxminddb::Reader::from_source(bytes.clone()).unwrap();
        reader.verify().unwrap();
        let db = open(&bytes).unwrap();
        assert_eq!(country(&db, "198.51.100.1").as_deref(), Some("DE"));
        assert_eq!(country(&db, "2001:db8::1").as_deref(), Some("US"));
        assert_eq!(country(&db, "192.0.2.1"), None);
    }
}

/// The writer's output passes the reference reader's own verifier, which is stricter than the
/// specification.
#[test]
fn written_databases_pass_the_readers_verification() {
    for record_size in [24, 28, 32] {
        let writer = NETWORKS.iter().fold(
            MmdbWriter::new().record_size(record_size),
            |w, (cidr, code)| w.insert(cidr, mmdb::country(code)),
        );
        let reader = maxminddb::Reader::from_source(writer.build()).unwrap();
        reader.verify().unwrap();
        let metadata = reader.metadata();
        assert_eq!(metadata.database_type, mmdb::DATABASE_TYPE);
        assert_eq!(metadata.ip_version, 6);
        assert_eq!(metadata.record_size, record_size);
        assert_eq!(metadata.binary_format_major_version, 2);
        assert_eq!(metadata.build_epoch, mmdb::BUILD_EPOCH);
        assert_eq!(metadata.languages, ["en"]);
    }
}

fn open(bytes: &[u8]) -> Result<CountryDb, GeoError> {
    CountryDb::open(temp_file(bytes).path())
}

fn temp_file(bytes: &[u8]) -> NamedTempFile {
    let mut file = NamedTempFile::new().unwrap();
    file.write_all(bytes).unwrap();
    file.flush().unwrap();
    file
}

fn country(db: &CountryDb, address: &str) -> Option<String> {
    db.country(address.parse().unwrap())
}

fn assert_names(message: &str, path: &Path) {
    let quoted = format!("`{}`", path.display());
    assert!(
        message.contains(&quoted),
        "{message} does not name {quoted}"
    );
}
