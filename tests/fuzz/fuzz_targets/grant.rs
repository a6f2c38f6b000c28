#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fz_fuzz::grant::grant(data));
