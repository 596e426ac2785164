//! Any bytes through the archive unpacker, as tar.gz and as tar.zst: never a panic, and
//! nothing is ever written outside the target directory.
#![no_main]
use deploy_manifest::archive::{UnpackLimits, unpack};
use deploy_manifest::model::ArchiveFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in [ArchiveFormat::TarGz, ArchiveFormat::TarZst] {
        let outer = tempfile::tempdir().unwrap();
        let dest = outer.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        // Small caps keep every run fast; the caps themselves are part of what is fuzzed.
        let limits = UnpackLimits {
            max_bytes: 16 << 20,
            max_entries: 10_000,
        };
        let _ = unpack(data, format, &dest, limits);
        let beside: Vec<_> = std::fs::read_dir(outer.path()).unwrap().collect();
        assert_eq!(beside.len(), 1, "something was written beside the target");
    }
});
