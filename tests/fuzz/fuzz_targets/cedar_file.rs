#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fz_fuzz::policy::cedar_file(data));
