//! Choosing values from the fuzzer's bytes: mostly from lists of meaningful values, so that
//! the input reaches past the first check, and sometimes anything at all.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::{Result, Unstructured};

/// One of `choices` three times in four, else any short string.
pub(crate) fn text(u: &mut Unstructured<'_>, choices: &[&str]) -> Result<String> {
    if choices.is_empty() || !u.ratio(3u8, 4)? {
        let length = u.int_in_range(0..=24)?;
        let bytes = u.bytes(length.min(u.len()))?;
        return Ok(String::from_utf8_lossy(bytes).into_owned());
    }
    Ok((*u.choose(choices)?).to_owned())
}

/// Up to `max` texts, each as [`text`] picks it.
pub(crate) fn texts(u: &mut Unstructured<'_>, choices: &[&str], max: usize) -> Result<Vec<String>> {
    let count = u.int_in_range(0..=max)?;
    (0..count).map(|_| text(u, choices)).collect()
}

/// One of `choices` (parsed addresses) three times in four, else any address of either
/// family.
pub(crate) fn address(u: &mut Unstructured<'_>, choices: &[IpAddr]) -> Result<IpAddr> {
    if !choices.is_empty() && u.ratio(3u8, 4)? {
        return Ok(*u.choose(choices)?);
    }
    Ok(if u.arbitrary()? {
        IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?))
    } else {
        IpAddr::V6(Ipv6Addr::from(u.arbitrary::<u128>()?))
    })
}

/// The addresses of `texts`, for lists of choices written as text.
pub(crate) fn ips(texts: &[&str]) -> Vec<IpAddr> {
    texts.iter().filter_map(|t| t.parse().ok()).collect()
}

/// A port: a meaningful one most of the time.
pub(crate) fn port(u: &mut Unstructured<'_>) -> Result<u16> {
    if u.ratio(3u8, 4)? {
        return Ok(*u.choose(&[40000, 443, 22, 5432, 53, 8000, 8100, 8101, 0, 65535])?);
    }
    u.arbitrary()
}
