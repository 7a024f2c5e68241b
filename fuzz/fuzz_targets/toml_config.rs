//! The configuration on arbitrary input: a TOML file through `alioth boot --config`'s whole
//! merge and checks, and the `--disk`, `--net`, `--vsock` and `--console` specs. A config or an
//! error, never a panic (exit status 2 is the worst a user's typo may cause).
#![no_main]

use alioth_cli::BootArgs;
use alioth_cli::config::{
    build_boot, parse_console, parse_disk_flag, parse_net_flag, parse_vsock_flag,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 5 {
        0 => {
            let path = std::env::temp_dir()
                .join(format!("alioth-fuzz-config-{}.toml", std::process::id()));
            if std::fs::write(&path, text).is_err() {
                return;
            }
            let args = BootArgs {
                config: Some(path),
                ..Default::default()
            };
            let _ = build_boot(&args);
        }
        1 => {
            let _ = parse_disk_flag(text);
        }
        2 => {
            let _ = parse_net_flag(text);
        }
        3 => {
            let _ = parse_vsock_flag(text);
        }
        _ => {
            let _ = parse_console(text, std::path::Path::new("/tmp"));
        }
    }
});
