//! The client's country, from a MaxMind-format database: GeoLite2-Country, GeoIP2-Country, the
//! City editions, or DB-IP's country and city lite files. The request context carries the country
//! found here, or none when no database is configured or the address is not in it.
//!
//! Boundary: [`CountryDb`] and [`GeoError`] are the whole interface; the `maxminddb` crate stays
//! behind them. The file is read into memory once, at [`CountryDb::open`] (blocking IO: call it at
//! start-up, or in `spawn_blocking`); lookups do no IO and never fail, since an address that
//! cannot be placed is simply of unknown country.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use maxminddb::{PathElement, Reader};

/// A country database held in memory.
pub struct CountryDb {
    path: PathBuf,
    reader: Reader<Vec<u8>>,
}

/// Why a country database could not be opened. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot read the country database `{path}`: {source}", path = .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a MaxMind DB file: {reason}", path = .path.display())]
    NotMaxMindDb { path: PathBuf, reason: String },
    #[error(
        "`{path}` holds no country data: its database type is `{database_type}`, \
         not a Country, City or Enterprise database",
        path = .path.display()
    )]
    NoCountryData {
        path: PathBuf,
        database_type: String,
    },
}

/// Database types whose records carry `country.iso_code`: MaxMind's GeoIP2/GeoLite2 Country,
/// City and Enterprise, and DB-IP's `DBIP-Country-Lite` and `DBIP-City-Lite`. Anything else
/// (ASN, ISP, anonymous IP, ...) would answer every lookup with "unknown", so it is refused at
/// open rather than silently turning every request's country into a missing fact.
const COUNTRY_DATABASE_TYPES: [&str; 3] = ["Country", "City", "Enterprise"];

const COUNTRY: [PathElement<'static>; 2] =
    [PathElement::Key("country"), PathElement::Key("iso_code")];
const REGISTERED_COUNTRY: [PathElement<'static>; 2] = [
    PathElement::Key("registered_country"),
    PathElement::Key("iso_code"),
];

impl CountryDb {
    /// Reads the database at `path` into memory and checks that it is a MaxMind DB with country
    /// data.
    pub fn open(path: &Path) -> Result<CountryDb, GeoError> {
        let bytes = std::fs::read(path).map_err(|source| GeoError::Read {
            path: path.to_owned(),
            source,
        })?;
        let reader = Reader::from_source(bytes).map_err(|error| GeoError::NotMaxMindDb {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
        let database_type = &reader.metadata().database_type;
        if !COUNTRY_DATABASE_TYPES
            .iter()
            .any(|kind| database_type.contains(kind))
        {
            return Err(GeoError::NoCountryData {
                path: path.to_owned(),
                database_type: database_type.clone(),
            });
        }
        Ok(CountryDb {
            path: path.to_owned(),
            reader,
        })
    }

    /// The ISO 3166-1 alpha-2 code (uppercase) of the country `ip` is in, else of the country
    /// its network is registered in; `None` when the database has neither for `ip`.
    ///
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as a dual-stack socket reports IPv4 peers)
    /// are looked up as the IPv4 address: the IPv4 part of an IPv6 database lives under `::/96`,
    /// and only some databases alias `::ffff:0:0/96` to it.
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        let ip = ip.to_canonical();
        let found = match self.reader.lookup(ip) {
            Ok(found) => found,
            // An IPv6 address in an IPv4-only database, or a damaged tree.
            Err(error) => {
                tracing::debug!(%ip, %error, path = %self.path.display(), "country lookup failed");
                return None;
            }
        };
        [&COUNTRY, &REGISTERED_COUNTRY]
            .into_iter()
            .find_map(|path| match found.decode_path::<&str>(path) {
                Ok(code) => code.and_then(alpha2),
                Err(error) => {
                    tracing::debug!(%ip, %error, path = %self.path.display(), "bad country record");
                    None
                }
            })
    }
}

impl fmt::Debug for CountryDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let metadata = self.reader.metadata();
        f.debug_struct("CountryDb")
            .field("path", &self.path)
            .field("database_type", &metadata.database_type)
            .field("build_epoch", &metadata.build_epoch)
            .finish_non_exhaustive()
    }
}

/// `code` uppercased if it has the shape of an alpha-2 code; anything else counts as no code.
fn alpha2(code: &str) -> Option<String> {
    (code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic()))
        .then(|| code.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::{CountryDb, alpha2};

    #[test]
    fn one_database_serves_every_task() {
        fn shareable<T: Send + Sync>() {}
        shareable::<CountryDb>();
    }

    #[test]
    fn only_two_letters_make_a_code() {
        for (input, expected) in [
            ("DE", Some("DE")),
            ("de", Some("DE")),
            ("dE", Some("DE")),
            ("", None),
            ("D", None),
            ("DEU", None),
            ("D1", None),
            ("--", None),
            ("ÄÖ", None),
        ] {
            assert_eq!(alpha2(input).as_deref(), expected, "{input:?}");
        }
    }
}
