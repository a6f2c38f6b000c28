#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fz_fuzz::dns::dns_stub(data));
