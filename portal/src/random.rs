//! Randomness from the operating system, and the ids made of it. Ids are not secret, only
//! unique; secrets (tokens, preshared keys) are random bytes of their own.

/// `N` bytes from the operating system's generator.
pub fn bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)?;
    Ok(bytes)
}

/// `PREFIX_` and 12 random bytes in hex.
pub fn id(prefix: &str) -> Result<String, getrandom::Error> {
    Ok(format!("{prefix}_{}", hex(&bytes::<12>()?)))
}

/// `PREFIX_`, the wall clock's milliseconds since the epoch in 12 hex digits, and 10 random
/// bytes in hex. For the ids of rows made in bulk (grants): ids made one after another sort in
/// that order, so the indexes that hold them (the table's key, the flow log's by grant) grow at
/// their right edge, and a batch of a hundred grants dirties a few of their pages instead of a
/// hundred; a random id would land each on a page of its own. The order serves storage only:
/// nothing reads meaning into it, and a clock set back costs locality, not uniqueness.
pub fn ordered_id(prefix: &str) -> Result<String, getrandom::Error> {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    // 48 bits of milliseconds last until the year 10889.
    let millis = u64::try_from(millis).unwrap_or(u64::MAX) & 0xffff_ffff_ffff;
    Ok(format!("{prefix}_{millis:012x}{}", hex(&bytes::<10>()?)))
}

/// A uniformly random index below `len` (0 when `len` is 0): the gateway pick.
pub fn index(len: usize) -> Result<usize, getrandom::Error> {
    let len = u64::try_from(len).unwrap_or(u64::MAX);
    if len == 0 {
        return Ok(0);
    }
    // Rejection sampling: drawing again above the largest multiple of `len` keeps the
    // result uniform.
    let zone = u64::MAX - u64::MAX % len;
    loop {
        let value = u64::from_le_bytes(bytes()?);
        if value < zone {
            return Ok(usize::try_from(value % len).unwrap_or(0));
        }
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn indexes_stay_below_the_length_and_cover_it() {
        let mut seen = [false; 3];
        for _ in 0..200 {
            let i = super::index(3).unwrap();
            seen[i] = true;
        }
        assert_eq!(seen, [true; 3]);
        assert_eq!(super::index(0).unwrap(), 0);
        assert_eq!(super::hex(&[0x00, 0xab, 0xff]), "00abff");
    }

    #[test]
    fn ordered_ids_sort_in_the_order_they_were_made_and_differ() {
        let ids: Vec<String> = (0..1000)
            .map(|_| super::ordered_id("gr").unwrap())
            .collect();
        for id in &ids {
            assert_eq!(id.len(), "gr_".len() + 12 + 20, "{id}");
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "ids repeat");
        // In order of their millisecond (ids of one millisecond may come in either order).
        for pair in ids.windows(2) {
            assert!(
                pair[0][..15] <= pair[1][..15],
                "{} then {}",
                pair[0],
                pair[1]
            );
        }
    }
}
