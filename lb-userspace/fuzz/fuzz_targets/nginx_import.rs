//! `xlb import nginx` on arbitrary text: the parser and the mapping must never panic; a refusal
//! names the file and a line of it; what is imported is a config `Config::parse` accepts, and
//! every diagnostic names a line of the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xlb::{
    config::Config,
    import::{self, Completeness, nginx},
};

const MAIN: &str = "/etc/nginx/nginx.conf";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.split('\n').count();
    let in_file = |line: usize| (1..=lines).contains(&line);
    let tree = match nginx::parse_text(Path::new(MAIN), text, &[]) {
        Ok(tree) => tree,
        Err(e) => {
            assert!(!e.message.trim().is_empty(), "the error says what is wrong: {e}");
            assert!(e.at.line == 0 || in_file(e.at.line), "line {} of a {lines}-line file: {e}", e.at.line);
            return;
        }
    };
    let opts = import::Options { address: Some([203, 0, 113, 10].into()), interface: "eth0".into(), base: "/etc/nginx".into() };
    match import::from_tree(Path::new(MAIN), &tree, &opts) {
        Ok(outcome) => {
            for d in &outcome.import.diagnostics {
                assert!(in_file(d.at.line), "diagnostic on line {} of a {lines}-line file: {d}", d.at.line);
            }
            if outcome.completeness != Completeness::Impossible {
                Config::parse(Path::new("xlb.toml"), &outcome.toml).expect("the imported config parses");
            }
        }
        Err(e) => {
            assert!(!e.message.trim().is_empty(), "the error says what is wrong: {e}");
            assert!(e.at.line == 0 || in_file(e.at.line), "line {} of a {lines}-line file: {e}", e.at.line);
        }
    }
});
