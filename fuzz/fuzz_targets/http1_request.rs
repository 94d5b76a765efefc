//! Any bytes as what a client sends on an HTTP/1 connection, arriving in pieces of any size:
//! the head parser and the body decoder neither panic nor let a body decode to another length
//! than it declared (`portcullis_proxy::h1::check_request_bytes`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the rest arrives: whole, or a few bytes at a time.
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = if step == 0 { rest.len() } else { usize::from(step % 32) };
    portcullis_proxy::h1::check_request_bytes(rest, step);
});
