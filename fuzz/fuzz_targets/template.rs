//! Any string through env-template expansion: never a panic, and an accepted value has no
//! placeholder left in it.
#![no_main]
use deploy_manifest::template::{Placeholder, expand};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let mut lookup = |p: Placeholder<'_>| -> Result<String, String> {
        match p {
            Placeholder::Host => Ok("127.0.0.1".into()),
            Placeholder::Port(n) if n == "http" => Ok("8080".into()),
            Placeholder::Port(n) => Err(format!("unknown port {n}")),
            Placeholder::Secret(_) => Ok("s".into()),
        }
    };
    if let Ok((out, _)) = expand(value, &mut lookup) {
        assert!(!out.contains("${"), "{value:?} -> {out:?}");
    }
});
