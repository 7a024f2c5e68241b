use std::path::Path;
use std::process::Command;

use super::*;

#[test]
fn template_placeholders_are_filled_and_shell_quoted() {
    let p = Placeholders {
        kernel: Path::new("/k it/kit's.elf"),
        cmdline: "kit.test=blk-rw kit.ring=split",
        disk: Path::new("/d/x.img"),
        memory_mib: 128,
    };
    let cmd = fill_template("printf '%s|' {kernel} {cmdline} {disk} {memory}", &p);
    let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/k it/kit's.elf|kit.test=blk-rw kit.ring=split|/d/x.img|128|"
    );
}
