//! Any bytes through the manifest parser and validator: never a panic, and whatever it
//! accepts survives a round trip and passes the write-side check.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = deploy_manifest::validate::parse_manifest(data, "fuzz") {
        deploy_manifest::validate::check_manifest(&m, "fuzz")
            .expect("an accepted manifest re-validates");
        let bytes = serde_json::to_vec(&m).expect("serialises");
        let again = deploy_manifest::validate::parse_manifest(&bytes, "fuzz").expect("round trip");
        assert_eq!(again, m);
    }
});
