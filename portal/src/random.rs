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
}
