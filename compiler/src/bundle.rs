//! The bundle: the decision table as a file. JSON, versioned, with a SHA-256 content hash of
//! the table, so the portal can tell which policy decided what and refuse a damaged file.
//!
//! INVARIANT: the same tree gives byte-identical bundles (the table's lists are sorted and
//! serde writes struct fields in declaration order; no maps are serialised).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::table::Table;

/// Written into every bundle; readers refuse bundles of any other format. Version 2 files
/// deny rules under every resource inside their targets too; a version 1 table lacks those
/// entries (a guardrail could be carved around), so it is refused rather than read.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_NAME: &str = "fz-bundle";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub format: String,
    pub version: u32,
    /// `sha256:` and the hex digest of the table's compact JSON.
    pub hash: String,
    pub table: Table,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the file is not an fz bundle (format `{0}`)")]
    Format(String),
    #[error(
        "the bundle has format version {found}; this build reads version {FORMAT_VERSION} only: compile the tree again with this build's `fzc compile`"
    )]
    Version { found: u32 },
    #[error(
        "the bundle's content hash does not match its table (expected {expected}, computed {computed}): the file is damaged or was edited"
    )]
    Hash { expected: String, computed: String },
    #[error("the bundle's table is inconsistent: {0}")]
    Invalid(String),
}

impl Bundle {
    pub fn new(table: Table) -> Result<Bundle, BundleError> {
        let hash = content_hash(&table)?;
        Ok(Bundle {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            hash,
            table,
        })
    }

    /// The bundle file's bytes: pretty JSON ending in a newline.
    pub fn to_bytes(&self) -> Result<Vec<u8>, BundleError> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Reads a bundle, checking its format, version, content hash and that every reference in
    /// the table is in range.
    pub fn from_bytes(bytes: &[u8]) -> Result<Bundle, BundleError> {
        #[derive(Deserialize)]
        struct Header {
            format: String,
            version: u32,
        }
        let header: Header = serde_json::from_slice(bytes)?;
        if header.format != FORMAT_NAME {
            return Err(BundleError::Format(header.format));
        }
        if header.version != FORMAT_VERSION {
            return Err(BundleError::Version {
                found: header.version,
            });
        }
        let bundle: Bundle = serde_json::from_slice(bytes)?;
        let computed = content_hash(&bundle.table)?;
        if computed != bundle.hash {
            return Err(BundleError::Hash {
                expected: bundle.hash,
                computed,
            });
        }
        bundle.table.validate().map_err(BundleError::Invalid)?;
        Ok(bundle)
    }
}

fn content_hash(table: &Table) -> Result<String, BundleError> {
    let digest = Sha256::digest(serde_json::to_vec(table)?);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}
