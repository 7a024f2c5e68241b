//! vhost-user message streams from a hostile frontend, handled by one backend connection.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    alioth_vhost_user::fuzzing::run_messages(data);
});
