//! The config parser on arbitrary text: it must never panic, and every refusal must be a
//! `ConfigError` naming the file (and a line of it, when it gives one) with a message.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xlb::config::Config;

fuzz_target!(|data: &[u8]| {
    // `Config::load` reads the file as UTF-8 and refuses anything else with its own error.
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(Path::new("fuzz.toml"), text) {
        Ok(config) => {
            // What parses is what the daemon gets: the same text parses the same again.
            let again = Config::parse(Path::new("fuzz.toml"), text).expect("parses twice");
            assert_eq!(format!("{config:?}"), format!("{again:?}"));
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.toml"), "the error names the file: {shown}");
            assert!(!e.message.trim().is_empty(), "the error says what is wrong: {shown:?}");
            if let Some(line) = e.line {
                let lines = text.split('\n').count();
                assert!((1..=lines).contains(&line), "line {line} of a {lines}-line file: {shown}");
            }
        }
    }
});
