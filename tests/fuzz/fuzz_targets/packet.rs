#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fz_fuzz::packet::packet(data));
